"""The flush callback fails: it raises N times, or raises KeyboardInterrupt / SystemExit."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder

pytestmark = [pytest.mark.faults, pytest.mark.redis]


def _settle_with_process_pending(buf, on_pass=None, timeout=60.0):
    """Call process_pending (which honours backoff) until nothing is pending or in flight."""
    deadline = time.monotonic() + timeout
    passes = 0
    while True:
        passes += 1
        buf.process_pending()
        if on_pass is not None:
            on_pass(passes)
        stats = buf.stats()
        if stats.pending_rows == 0 and stats.in_flight_batches == 0 and passes > 10:
            return passes
        assert time.monotonic() < deadline, f"not settled: {stats!r}"
        time.sleep(0.01)


@pytest.mark.parametrize("failures", [1, 4])
def test_callback_raising_n_times_redelivers_the_same_batch(server, prefix, failures):
    rec = Recorder(fail_times=failures)
    buf = RedisBuffer.from_url(
        server.url,
        flush=rec,
        key_prefix=prefix,
        delay=0,
        partitions=1,  # one batch, so the N failures all hit it
        lease=30,  # a redelivery here can only come from the failure path, not lease expiry
        max_attempts=failures + 2,
        retry_backoff=0.05,
        retry_backoff_max=0.2,
    )
    expected = defaultdict(int)
    for k in range(150):
        buf.incr("g", {"n": 1, "v": k}, {"id": k % 50})
        expected[k % 50] += k
    first = {i: buf.get("g", {"id": i}) for i in range(50)}

    added = []

    def more_while_failing(passes):
        # While the batch is held (failed, waiting for its backoff), updates to its rows start
        # new pending rows, which must wait for it.
        if rec.calls and not rec.applied and len(added) < 5:
            for i in range(0, 50, 7):
                buf.incr("g", {"n": 1, "v": 1000}, {"id": i})
                expected[i] += 1000
            added.append(passes)

    _settle_with_process_pending(buf, more_while_failing)

    assert added
    failing_id = rec.calls[0].id
    tries = [b for b in rec.calls if b.id == failing_id]
    assert [b.attempt for b in tries] == list(range(1, failures + 2))
    # Redelivered unchanged: same rows with the same merged values every time.
    for b in tries:
        assert {u.filters["id"]: u for u in b} == first
    # Then the updates that arrived meanwhile, in one later batch, exactly once.
    later = [b for b in rec.calls if b.id != failing_id]
    assert [b.attempt for b in later] == [1]
    assert {u.filters["id"] for u in later[0]} == set(range(0, 50, 7))
    # Nothing lost, nothing counted twice.
    totals = defaultdict(int)
    for u in rec.updates():
        totals[u.filters["id"]] += u.columns["v"]
    assert totals == expected
    assert rec.total("n") == 150 + len(added) * len(range(0, 50, 7))
    assert rec.overlaps == []
    stats = buf.stats()
    assert stats.callback_failures == failures
    assert stats.retries == failures
    assert stats.dead_letters == 0 and stats.rows_flushed == 50 + len(range(0, 50, 7))
    buf.close()


def test_failures_spread_over_partitions_keep_ids_and_lose_nothing(server, prefix):
    rec = Recorder(fail_times=7)
    buf = RedisBuffer.from_url(
        server.url,
        flush=rec,
        key_prefix=prefix,
        delay=0,
        partitions=8,
        batch_size=5,
        max_attempts=20,
        retry_backoff=0.02,
        retry_backoff_max=0.1,
    )
    for k in range(600):
        buf.incr("g", {"n": 1}, {"id": k % 120})
    _settle_with_process_pending(buf)
    attempts = defaultdict(list)
    contents = defaultdict(list)
    for b in rec.calls:
        attempts[b.id].append(b.attempt)
        contents[b.id].append(sorted((u.filters["id"], u.columns["n"]) for u in b))
    assert all(a == list(range(1, len(a) + 1)) for a in attempts.values()), attempts
    assert sum(len(a) - 1 for a in attempts.values()) == 7
    assert all(len({tuple(c) for c in cs}) == 1 for cs in contents.values())
    assert rec.total("n") == 600
    assert len(rec.updates()) == 120
    assert buf.stats().callback_failures == 7
    buf.close()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_callback_interrupted_keeps_the_batch(server, prefix, exc_type):
    rec = Recorder()
    raised = []

    def flush(batch):
        if not raised:
            raised.append(batch.id)
            raise exc_type("stop right there")
        rec(batch)

    buf = RedisBuffer.from_url(
        server.url,
        flush=flush,
        key_prefix=prefix,
        delay=0,
        partitions=1,
        lease=30,  # redelivery must come from the release on interrupt, not from lease expiry
        retry_backoff=0.05,
    )
    for k in range(40):
        buf.incr("g", {"n": 1}, {"id": k % 10}, extra={"last": k})
    with pytest.raises(exc_type):
        buf.process_pending()
    stats = buf.stats()
    assert stats.in_flight_batches == 1 and stats.in_flight_rows == 10
    assert stats.callback_failures == 1
    kept = buf.get("g", {"id": 3})
    assert kept is not None and kept.columns == {"n": 4} and kept.count == 4
    buf.incr("g", {"n": 1}, {"id": 3}, extra={"last": 99})

    _settle_with_process_pending(buf)
    by_id = defaultdict(list)
    for b in rec.calls:
        by_id[b.id].append(b.attempt)
    assert by_id[raised[0]] == [2]  # the interrupted batch, same id, next attempt
    assert rec.total("n") == 41
    assert len(rec.calls) == 2
    assert rec.calls[-1][0].extra == {"last": 99}  # the newer row came after the older batch
    buf.close()
