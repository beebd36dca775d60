"""Connections dropped by the server (``CLIENT KILL TYPE normal``) between and during operations."""

from __future__ import annotations

import time

import pytest

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder

pytestmark = [pytest.mark.faults, pytest.mark.redis]


def _kill_clients(server) -> int:
    """Close every normal client connection except this one; return how many were closed."""
    killed = server.execute("CLIENT", "KILL", "TYPE", "normal")
    assert isinstance(killed, int)
    return killed


def test_connections_killed_between_operations(server, prefix):
    """Every call after a kill reconnects by itself: no error, nothing lost."""
    rec = Recorder()
    buf = RedisBuffer.from_url(
        server.url, flush=rec, key_prefix=prefix, delay=0, lease=30, retry_backoff=0.01
    )
    expected = 0
    killed = 0
    for rnd in range(30):
        for k in range(10):
            buf.incr("g", {"n": 1, "v": rnd * 10 + k}, {"id": k % 4})
            expected += rnd * 10 + k
        killed += _kill_clients(server)
        # Row 1 holds this round's k = 1, 5, 9 (the previous rounds were flushed).
        assert buf.get("g", {"id": 1}).columns == {"n": 3, "v": 3 * rnd * 10 + 15}
        killed += _kill_clients(server)
        buf.stats()
        killed += _kill_clients(server)
        assert buf.process_pending() == 4
        killed += _kill_clients(server)
    assert killed >= 4 * 30  # each kill found the buffer's pooled connection
    assert rec.total("n") == 300 and rec.total("v") == expected
    assert [b.attempt for b in rec.calls] == [1] * len(rec.calls)
    stats = buf.stats()
    assert (stats.pending_rows, stats.in_flight_batches, stats.rows_flushed) == (0, 0, 120)
    buf.close()


def test_connection_killed_inside_the_callback(server, prefix):
    """Between claim and ack: the ack reconnects and the batch is acknowledged once."""
    kills = []

    class KillingRecorder(Recorder):
        def __call__(self, batch):
            kills.append(_kill_clients(server))
            super().__call__(batch)

    rec = KillingRecorder()
    buf = RedisBuffer.from_url(server.url, flush=rec, key_prefix=prefix, delay=0, partitions=2)
    for k in range(200):
        buf.incr("g", {"n": 1}, {"id": k % 25})
    assert buf.drain() == 25
    assert all(kills) and len(kills) == len(rec.calls) == 2
    assert [b.attempt for b in rec.calls] == [1, 1]
    assert rec.total("n") == 200
    stats = buf.stats()
    assert (stats.pending_rows, stats.in_flight_batches) == (0, 0)
    buf.close()


def test_kill_storm_during_concurrent_traffic(
    server, prefix, producers, make_ledger, settle, flush_loop
):
    """Connections dropped at random moments, mid-command included, under producers + flusher.

    A call on a connection killed mid-command raises BackendError (it may have run); every call
    that returned is delivered exactly once to the batch-id ledger.
    """
    producer_buf = RedisBuffer.from_url(
        server.url, flush=lambda b: None, key_prefix=prefix, delay=0
    )
    ledger = make_ledger()
    worker_buf = RedisBuffer.from_url(
        server.url,
        flush=ledger,
        key_prefix=prefix,
        delay=0,
        lease=0.5,
        batch_size=8,
        retry_backoff=0.02,
    )
    prod = producers(producer_buf, threads=3, rows=20, pause=0, seed=5)
    flusher = flush_loop(worker_buf)
    kills = 0
    try:
        prod.wait_for_acked(200)
        target = prod.tally.acked_calls() + 2000
        while prod.tally.acked_calls() < target:
            kills += _kill_clients(server)
            time.sleep(0.01)
    finally:
        tally = prod.stop()
        flusher.stop()
    assert kills > 50
    settle(worker_buf)
    tally.check_bounds(ledger.totals())
    assert worker_buf.stats().dead_letters == 0
    producer_buf.close()
    worker_buf.close()
