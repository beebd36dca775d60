"""Redis restarted (SIGTERM) or crashed (SIGKILL) with appendonly yes + appendfsync always."""

from __future__ import annotations

import pytest

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.errors import BackendError

pytestmark = [pytest.mark.faults, pytest.mark.redis]


def _bounce(server, how):
    old = server.pid
    if how == "restart":
        server.restart()  # SIGTERM: redis finishes, fsyncs the AOF and exits; then start again
    else:
        server.kill()  # SIGKILL: a crash; only what was fsynced to the AOF comes back
        server.start()
    assert server.pid != old


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_no_acknowledged_incr_lost_across_a_restart(
    aof_server, prefix, how, producers, make_ledger, settle, flush_loop
):
    url = f"{aof_server.url}?socket_timeout=2"
    producer_buf = RedisBuffer.from_url(url, flush=lambda b: None, key_prefix=prefix, delay=0)
    ledger = make_ledger()
    worker_buf = RedisBuffer.from_url(
        url, flush=ledger, key_prefix=prefix, delay=0, lease=1, batch_size=10, retry_backoff=0.05
    )
    # A flusher keeps claiming and acking through the outage: its claims, acks and failures hit
    # the dead server too.
    prod = producers(producer_buf, threads=3, rows=30, pause=0.0005, seed=3)
    flusher = flush_loop(worker_buf)
    try:
        prod.wait_for_acked(500)
        _bounce(aof_server, how)
        after = prod.tally.acked_calls()
        prod.wait_for_acked(after + 500)  # the same buffer objects work again
        _bounce(aof_server, how)
        prod.wait_for_acked(prod.tally.acked_calls() + 500)
        flusher.wait_for_progress()  # the flusher rode out both outages and still works
    finally:
        tally = prod.stop()
        flusher.stop()

    settle(worker_buf)  # batches whose ack was lost come back after their lease
    totals = ledger.totals()
    tally.check_bounds(totals)
    # Every acknowledged call is there; failed calls are few (the outages were short).
    assert sum(c for c, _, _ in totals.values()) >= tally.acked_calls() > 1500
    stats = worker_buf.stats()
    assert stats.dead_letters == 0
    # Redeliveries (lease expiry after a lost ack) kept their batch id: the ledger skipped them.
    # (Lists, not a loop over ledger.skipped: an empty list would check nothing.)
    assert ledger.skipped == ledger.redeliveries_of_applied()
    assert all(attempt > 1 for _, attempt in ledger.skipped), ledger.skipped
    assert set(ledger.applied) == {batch_id for batch_id, _, _ in ledger.deliveries}
    producer_buf.close()
    worker_buf.close()


@pytest.mark.parametrize("how", ["kill", "restart"])
def test_restart_between_claim_and_ack(aof_server, prefix, how, make_ledger, settle):
    """The server goes down inside the callback, after the claim and before the ack."""
    seen = []

    def bounce_once(ledger, batch):
        if not seen:
            seen.append((batch.id, batch.attempt))
            if how == "kill":
                aof_server.kill()  # stays down: the ack fails
            else:
                aof_server.restart()  # back before the ack

    ledger = make_ledger(hook=bounce_once)
    buf = RedisBuffer.from_url(
        f"{aof_server.url}?socket_timeout=2",
        flush=ledger,
        key_prefix=prefix,
        delay=0,
        partitions=1,
        lease=1.0,
    )
    for k in range(100):
        buf.incr("g", {"n": 1, "v": k}, {"id": k % 20})
    if how == "kill":
        with pytest.raises(BackendError, match="acknowledging a batch"):
            buf.process_pending()
        aof_server.start()
        # The claim was fsynced before its reply: the batch is still there, leased.
        stats = buf.stats()
        assert stats.in_flight_batches == 1 and stats.in_flight_rows == 20
        settle(buf, use_drain=False)
        batch_id, _ = seen[0]
        assert ledger.attempts()[batch_id] == [1, 2]  # same id, next attempt, after the lease
        assert ledger.skipped == [(batch_id, 2)]
    else:
        assert buf.process_pending() == 20  # the ack reconnected and went through
        settle(buf, use_drain=False)
        assert list(ledger.attempts().values()) == [[1]]
        assert ledger.skipped == []
    totals = ledger.totals()
    assert totals == {
        f"g:{i}": (5, 5, sum(k for k in range(100) if k % 20 == i)) for i in range(20)
    }
    stats = buf.stats()
    assert stats.rows_flushed == 20 and stats.dead_letters == 0
    buf.close()


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_local_window_pushes_survive_restarts_exactly(
    aof_server, prefix, how, producers, make_ledger, settle
):
    """With ``local_window``, incr is acknowledged in process; pushes that fail are retried with
    the same push id, so a push whose reply was lost is not applied twice: totals are exact.
    """
    url = f"{aof_server.url}?socket_timeout=2"
    window_buf = RedisBuffer.from_url(
        url, flush=lambda b: None, key_prefix=prefix, delay=0, local_window=0.02, batch_size=50
    )
    ledger = make_ledger()
    worker_buf = RedisBuffer.from_url(
        url, flush=ledger, key_prefix=prefix, delay=0, lease=1, batch_size=10, retry_backoff=0.05
    )
    prod = producers(window_buf, threads=2, rows=30, pause=0.0005, seed=4)
    try:
        prod.wait_for_acked(2000)
        _bounce(aof_server, how)
        prod.wait_for_acked(prod.tally.acked_calls() + 2000)
        _bounce(aof_server, how)
        prod.wait_for_acked(prod.tally.acked_calls() + 2000)
    finally:
        tally = prod.stop()
    window_buf.close()  # pushes what the window still holds
    settle(worker_buf)
    tally.check_exact(ledger.totals())
    assert worker_buf.stats().dead_letters == 0
    worker_buf.close()
