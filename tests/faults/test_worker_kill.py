"""Worker processes SIGKILLed inside the flush callback, and two workers flushing at once.

The workers (``_worker.py``) write each batch to a SQLite ledger keyed by batch id in one
transaction (an effectively-once host), so exact totals in the ledger prove that every
acknowledged ``incr`` was delivered and that redeliveries carried the same batch id.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest

from updatebuffer.backends.redis import RedisBuffer

pytestmark = [pytest.mark.faults, pytest.mark.redis]

KILLS = 24


def _no_flush(batch):
    raise AssertionError("the producers' buffer never flushes")


def test_sigkill_inside_callback_loses_and_duplicates_nothing(
    server, prefix, producers, spawn_worker, ledger_db, load_ledger
):
    rng = random.Random(20240601)
    common = ["--url", server.url, "--prefix", prefix, "--ledger", str(ledger_db)]
    producer_buf = RedisBuffer.from_url(server.url, flush=_no_flush, key_prefix=prefix, delay=0)
    prod = producers(producer_buf, threads=2, rows=40, pause=0.002, seed=1)
    prod.wait_for_acked(200)

    # Three ways to die, shuffled: "pre" is always killed inside the callback before the ledger
    # commit; "post" always between the ledger commit and the ack; "random" anywhere (in the
    # callback, in a claim/ack script call, between batches).
    plans = ["pre", "post", "random"] * (KILLS // 3)
    rng.shuffle(plans)
    kills = []  # (plan, pid, event words)
    for plan in plans:
        if plan == "pre":
            w = spawn_worker(*common, "--pre", "30", "30")
            event = w.wait_for("CB")
            time.sleep(rng.uniform(0, 0.05))
        elif plan == "post":
            w = spawn_worker(*common, "--pause-after-commit")
            event = w.wait_for("COMMITTED", "DUP")
        else:
            w = spawn_worker(*common, "--pre", "0", "0.05", "--post", "0", "0.02")
            event = w.wait_for("CB")
            time.sleep(rng.uniform(0, 0.3))
        w.kill()
        kills.append((plan, w.pid, event))
        w.close()

    tally = prod.stop()
    producer_buf.close()
    final = spawn_worker(*common, "--no-loop", "--settle")
    final.wait_for("SETTLED", timeout=120)
    final.finish()

    ledger = load_ledger(ledger_db)
    deliveries = ledger["deliveries"]
    by_batch = defaultdict(list)  # batch id -> [(delivery order, attempt, pid, outcome)]
    for order, batch_id, attempt, pid, _t0, _t1, outcome, _rows in deliveries:
        by_batch[batch_id].append((order, attempt, pid, outcome))

    # 1. Exact totals: every acknowledged incr is in the ledger once, nothing more.
    assert tally.acked_calls() > 1000
    tally.check_exact(ledger["totals"])

    # 2. Every delivered batch was eventually applied (exactly once: batch_id is the key), and
    #    each batch's attempts only grow from delivery to delivery.
    assert set(by_batch) == set(ledger["batches"])
    for batch_id, seen in by_batch.items():
        attempts = [a for _, a, _, _ in seen]
        assert attempts == sorted(attempts) and len(set(attempts)) == len(attempts), (
            batch_id,
            seen,
        )

    # 3. A batch killed inside the callback came back with the same id and a higher attempt,
    #    to another process, after its lease expired.
    pre = [(pid, words) for plan, pid, words in kills if plan == "pre"]
    assert len(pre) == KILLS // 3
    for pid, (_, batch_id, attempt) in pre:
        later = [(a, p) for _, a, p, _ in by_batch[batch_id] if a > int(attempt)]
        assert later, f"batch {batch_id} killed at attempt {attempt} was never redelivered"
        assert all(p != pid for _, p in later)
        assert batch_id in ledger["batches"]

    # 4. A batch killed after the ledger commit but before the ack was redelivered with the same
    #    id, and the ledger skipped it (no double count: totals above are exact).
    committed = [
        (pid, words[1], int(words[2]))
        for plan, pid, words in kills
        if plan == "post" and words[0] == "COMMITTED"
    ]
    assert committed, kills
    for pid, batch_id, attempt in committed:
        assert ledger["batches"][batch_id] == attempt
        redelivered = [(a, p, o) for _, a, p, o in by_batch[batch_id] if a > attempt]
        assert redelivered, f"committed batch {batch_id} was not redelivered"
        assert all(o in ("dup", None) for _, _, o in redelivered), redelivered
        assert any(o == "dup" for _, _, o in redelivered), redelivered
        assert all(p != pid for _, p, _ in redelivered)

    # 5. Redis is empty of this test's data and kept no dead letters.
    check = RedisBuffer.from_url(server.url, flush=_no_flush, key_prefix=prefix)
    stats = check.stats()
    check.close()
    assert (stats.pending_rows, stats.in_flight_batches, stats.dead_letters) == (0, 0, 0)
    assert stats.updates_accepted == tally.acked_calls()
    assert stats.retries >= KILLS // 3


def test_two_worker_processes_never_hold_a_row_in_two_live_batches(
    server, prefix, producers, spawn_worker, ledger_db, load_ledger, tmp_path
):
    stop_file = tmp_path / "stop"
    common = [
        "--url",
        server.url,
        "--prefix",
        prefix,
        "--ledger",
        str(ledger_db),
        "--lease",
        "60",  # far longer than any callback: no lease-expiry redelivery in this test
        "--batch-size",
        "6",
        "--pre",
        "0",
        "0.01",
        "--post",
        "0",
        "0.005",
        "--stop-file",
        str(stop_file),
        "--settle",
    ]
    producer_buf = RedisBuffer.from_url(server.url, flush=_no_flush, key_prefix=prefix, delay=0)
    prod = producers(producer_buf, threads=2, rows=24, pause=0.001, seed=2)
    workers = [spawn_worker(*common), spawn_worker(*common)]
    deadline = time.monotonic() + 120
    # Run until both workers delivered plenty of batches (not for a fixed time).
    while min(w.count("CB") for w in workers) < 40:
        assert time.monotonic() < deadline, [w.count("CB") for w in workers]
        for w in workers:
            assert w.proc.poll() is None, w.stderr()
        time.sleep(0.05)
    tally = prod.stop()
    producer_buf.close()
    stop_file.touch()
    for w in workers:
        w.wait_for("SETTLED", timeout=120)
        w.finish()

    ledger = load_ledger(ledger_db)
    tally.check_exact(ledger["totals"])
    deliveries = ledger["deliveries"]
    assert {pid for _, _, _, pid, *_ in deliveries} == {w.pid for w in workers}
    # No failure and no expired lease: one delivery per batch, all applied.
    assert all(
        outcome == "applied" and attempt == 1 for _, _, attempt, _, _, _, outcome, _ in deliveries
    )
    assert len(deliveries) == len(ledger["batches"])

    # Every row's delivery intervals (callback entry to return, monotonic clock shared by the
    # processes) from distinct batches never overlap.
    per_row = defaultdict(list)
    for _, batch_id, _, pid, t0, t1, _, rows in deliveries:
        assert t1 is not None and t1 >= t0
        for row in rows.split():
            per_row[row].append((t0, t1, batch_id, pid))
    overlaps = []
    shared_rows = 0
    for row, spans in per_row.items():
        spans.sort()
        if len({pid for *_, pid in spans}) == 2:
            shared_rows += 1
        for i, (_s0, e0, b0, _) in enumerate(spans):
            for s1, _e1, b1, _ in spans[i + 1 :]:
                if s1 > e0:
                    break
                if b1 != b0:
                    overlaps.append((row, b0, b1))
    assert overlaps == []
    # The test means something only if both workers handled the same rows.
    assert shared_rows >= len(per_row) // 2
