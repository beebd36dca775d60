"""drain() ignores delay and retry backoff on every backend: failed batches waiting for their
backoff, split halves of a failed batch, and (with ``local_window``) a push that failed."""

from __future__ import annotations

import pytest
import redis

from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder

BACKENDS = ["memory", "redis", "redis-window"]


@pytest.fixture
def make(request, key_prefix):
    made, clients = [], []

    def make(flush, **options):
        kind = request.param
        if kind == "memory":
            buf = MemoryBuffer(flush=flush, **options)
        else:
            server = request.getfixturevalue("redis_server")
            client = redis.Redis(host=server.host, port=server.port)
            clients.append(client)
            window = 3600 if kind == "redis-window" else 0
            buf = RedisBuffer(
                flush=flush,
                client=client,
                key_prefix=key_prefix,
                partitions=1,
                local_window=window,
                **options,
            )
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()
    for client in clients:
        client.close()


def _ids(rec):
    return sorted(u.filters["id"] for u in rec.updates())


@pytest.mark.parametrize("make", BACKENDS, indirect=True)
def test_drain_delivers_a_batch_waiting_for_its_backoff(make):
    rec = Recorder(fail_times=1)
    buf = make(rec, delay=3600, retry_backoff=3600)
    for i in range(3):
        buf.incr("g", {"n": 1}, {"id": i})
    assert buf.drain() == 0  # the first delivery fails; backoff an hour
    assert buf.process_pending() == 0  # honours the backoff
    assert buf.drain() == 3
    assert _ids(rec) == [0, 1, 2]
    assert [b.attempt for b in rec.calls] == [1, 2]
    assert rec.calls[0].id == rec.calls[1].id


@pytest.mark.parametrize("make", BACKENDS, indirect=True)
def test_drain_delivers_the_healthy_half_of_a_split_batch(make):
    rec = Recorder(poison=(("g", {"id": 0}),))
    buf = make(rec, delay=3600, retry_backoff=3600, max_attempts=1)
    for i in range(4):
        buf.incr("g", {"n": 1}, {"id": i})
    # Every drain tries each failed batch (or its split halves) once more, without waiting for
    # the hour of backoff: memory splits within one drain, Redis one level per drain.
    flushed = sum(buf.drain() for _ in range(4))
    assert flushed == 3
    assert _ids(rec) == [1, 2, 3]
    assert [letter.update.filters for letter in buf.dead_letters()] == [{"id": 0}]


@pytest.mark.redis
@pytest.mark.parametrize("make", ["redis-window"], indirect=True)
def test_drain_pushes_a_window_whose_push_failed_and_waits_for_backoff(make):
    rec = Recorder()
    buf = make(rec, delay=3600)
    window = buf._window
    push, failures = window._flush, []

    def failing_once(batch):
        if not failures:
            failures.append(batch.id)
            raise ConnectionError("redis went away")
        push(batch)

    window._flush = failing_once
    window.retry_backoff = window.retry_backoff_max = 3600
    buf.incr("g", {"n": 1}, {"id": 1})
    window.drain()  # the push fails: its batch waits an hour in the window
    assert failures and window.stats().in_flight_rows == 1
    assert buf.drain() == 1
    assert _ids(rec) == [1]


def test_memory_drain_retries_a_batch_that_fails_on_another_thread_meanwhile():
    """drain() while a Flusher-like thread is delivering: when that delivery fails, the batch is
    retried by this drain, not left waiting out an hour of backoff."""
    import threading

    entered, release = threading.Event(), threading.Event()
    delivered = []

    def flush(batch):
        if threading.current_thread().name == "other":
            entered.set()
            release.wait(30)
            raise RuntimeError("the other thread's delivery fails")
        delivered.extend(batch)

    buf = MemoryBuffer(flush=flush, retry_backoff=3600, retry_backoff_max=3600)
    buf.incr("g", {"n": 5}, {"id": 1})
    other = threading.Thread(target=buf.process_pending, name="other")
    other.start()
    assert entered.wait(30)
    result = []
    drainer = threading.Thread(target=lambda: result.append(buf.drain()))
    drainer.start()
    # Wait until drain() is really parked on the buffer's condition (CPython's Condition).
    while not buf._room._waiters:
        assert drainer.is_alive(), f"drain() returned {result} while the batch was in flight"
        drainer.join(0.001)
    release.set()
    other.join(30)
    drainer.join(30)
    assert result == [1]
    assert [dict(u.columns) for u in delivered] == [{"n": 5}]
    buf.close()
