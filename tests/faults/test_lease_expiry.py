"""A callback outlives its lease: the batch is redelivered to another flusher meanwhile.

DESIGN.md section 9, lease fencing: both flushers apply the batch (at-least-once) and the
batch-id ledger makes that harmless, as long as the redelivery carries the same batch id.
"""

from __future__ import annotations

import threading
import time

import pytest

from updatebuffer.backends.redis import RedisBuffer

pytestmark = [pytest.mark.faults, pytest.mark.redis]


def _run_with_overrun(server, prefix, make_ledger, settle, *, max_attempts, fail_first):
    """Flusher A's callback fails ``fail_first`` times, then applies the batch and hangs past its
    lease; flusher B takes the batch over meanwhile, then A returns and acks late.

    Return the shared ledger, the expected totals, A's and B's deliveries and the final stats.
    """
    committed = threading.Event()
    release = threading.Event()
    ledger = make_ledger()  # the host database both flushers write to
    a_calls = []

    def flush_a(batch):
        a_calls.append((batch.id, batch.attempt))
        if len(a_calls) <= fail_first:
            raise RuntimeError("database down")
        ledger(batch)
        committed.set()
        release.wait(timeout=60)  # hangs past the lease, then returns (success)

    options = {
        "key_prefix": prefix,
        "delay": 0,
        "partitions": 1,
        "lease": 0.5,
        "max_attempts": max_attempts,
        "retry_backoff": 0.01,
        "retry_backoff_max": 0.02,
    }
    a = RedisBuffer.from_url(server.url, flush=flush_a, **options)
    for k in range(60):
        a.incr("g", {"n": 1, "v": k}, {"id": k % 6})
    expected = {f"g:{i}": (10, 10, sum(range(i, 60, 6))) for i in range(6)}

    a_errors = []

    def run_a():
        try:
            deadline = time.monotonic() + 60
            while not committed.is_set() and time.monotonic() < deadline:
                a.process_pending()
                time.sleep(0.005)
        except BaseException as exc:
            a_errors.append(exc)

    thread_a = threading.Thread(target=run_a, name="flusher-a", daemon=True)
    thread_a.start()
    assert committed.wait(timeout=60), a_calls

    # Flusher B shares A's ledger (same host database) and takes over after the lease.
    b_seen = []

    def flush_b(batch):
        b_seen.append((batch.id, batch.attempt))
        ledger(batch)

    b = RedisBuffer.from_url(server.url, flush=flush_b, **options)
    try:
        deadline = time.monotonic() + 60
        while not b_seen:
            assert time.monotonic() < deadline, "the expired lease was never taken over"
            b.process_pending()
            time.sleep(0.02)
    finally:
        release.set()  # A's callback returns now and A acks late
    thread_a.join(timeout=60)
    assert not thread_a.is_alive() and not a_errors, a_errors
    settle(b)
    stats = b.stats()
    a.close()
    b.close()
    return ledger, expected, a_calls, b_seen, stats


def test_lease_expiry_mid_callback_redelivers_the_same_batch(server, prefix, make_ledger, settle):
    ledger, expected, a_calls, b_seen, stats = _run_with_overrun(
        server, prefix, make_ledger, settle, max_attempts=10, fail_first=0
    )
    [(batch_id, attempt)] = a_calls
    assert attempt == 1
    assert b_seen[0] == (batch_id, 2)  # same id, next attempt, while A still held it
    assert (batch_id, 2) in ledger.skipped  # the ledger absorbed the second application
    assert ledger.totals() == expected
    assert (stats.pending_rows, stats.in_flight_batches, stats.dead_letters) == (0, 0, 0)


@pytest.mark.parametrize("fail_first", [0, 2])
def test_lease_expiry_at_the_last_attempt_is_not_applied_twice(
    server, prefix, make_ledger, settle, fail_first
):
    ledger, expected, a_calls, b_seen, _ = _run_with_overrun(
        server, prefix, make_ledger, settle, max_attempts=fail_first + 1, fail_first=fail_first
    )
    batch_id = a_calls[0][0]
    assert [a for _, a in a_calls] == list(range(1, fail_first + 2))
    assert ledger.totals() == expected, (b_seen, ledger.skipped)
    assert b_seen[0] == (batch_id, fail_first + 2)
