"""The Flusher's thread: it never dies but by stop(), never runs twice, and survives fork()."""

from __future__ import annotations

import os
import threading

import pytest
import redis
from fork_helpers import PATIENCE, wait_child

import updatebuffer
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.backends.redis import RedisBuffer

# Long enough for a stuck thread or child never to be mistaken for a slow one; only reached
# when the test fails.


class Scripted:
    """A Flushable whose process_pending() raises the given exceptions in turn, then counts."""

    def __init__(self, *raises: BaseException) -> None:
        self.raises = list(raises)
        self.calls = 0
        self.recovered = threading.Event()

    def process_pending(self) -> int:
        self.calls += 1
        if self.raises:
            raise self.raises.pop(0)
        self.recovered.set()
        return 0

    def drain(self) -> int:
        return 0


class Flaky:
    """A flush callback raising the given exceptions in turn, then recording batches."""

    def __init__(self, *raises: BaseException) -> None:
        self.raises = list(raises)
        self.calls: list[tuple[str, int]] = []
        self.applied: list[updatebuffer.Batch] = []
        self.done = threading.Event()

    def __call__(self, batch: updatebuffer.Batch) -> None:
        self.calls.append((batch.id, batch.attempt))
        if self.raises:
            raise self.raises.pop(0)
        self.applied.append(batch)
        self.done.set()


def test_outage_does_not_end_the_loop():
    source = Scripted(ConnectionError("redis down"), ConnectionError("still down"))
    flusher = updatebuffer.Flusher(source, interval=0.01)
    with flusher:
        assert source.recovered.wait(PATIENCE), "the loop died with the outage"
        assert flusher.running
    assert flusher.errors == 2
    assert isinstance(flusher.last_error, ConnectionError)
    assert str(flusher.last_error) == "still down"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()])
def test_base_exception_from_the_callback_is_a_failed_delivery(exc):
    flush = Flaky(exc)
    buf = MemoryBuffer(flush=flush, retry_backoff=0.01)
    buf.incr("g", {"n": 7}, {"id": 1})
    flusher = updatebuffer.Flusher(buf, interval=0.01).start()
    try:
        assert flush.done.wait(PATIENCE), "the flusher thread died with the callback's exception"
        assert flusher.running
    finally:
        flusher.stop()
        buf.close()
    assert flusher.errors == 1
    assert flusher.last_error is exc
    [(first_id, first_attempt), (again_id, again_attempt)] = flush.calls
    assert (again_id, first_attempt, again_attempt) == (first_id, 1, 2)  # the same batch, again
    assert [u.columns["n"] for b in flush.applied for u in b] == [7]


def test_keyboard_interrupt_still_reaches_a_direct_caller():
    flush = Flaky(KeyboardInterrupt())
    buf = MemoryBuffer(flush=flush, retry_backoff=3600)
    buf.incr("g", {"n": 1}, {"id": 1})
    with pytest.raises(KeyboardInterrupt):
        buf.process_pending()
    assert buf.drain() == 1  # kept, and drain() ignores the backoff
    buf.close()


def test_second_start_is_refused_and_runs_one_thread():
    source = Scripted()
    flusher = updatebuffer.Flusher(source, interval=3600, name="ub-double-start")
    flusher.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            flusher.start()
        named = [t for t in threading.enumerate() if t.name == "ub-double-start"]
        assert len(named) == 1
    finally:
        flusher.stop()
    assert not flusher.running
    flusher.start()  # a stopped flusher may start again
    flusher.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_gets_its_own_running_thread_and_fresh_lock():
    parent_flush = Flaky()
    buf = MemoryBuffer(flush=parent_flush, delay=0)
    flusher = updatebuffer.Flusher(buf, interval=0.01).start()
    try:
        # Held at fork: a child that kept this lock would hang in stop().
        with flusher._lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                code = 1
                try:
                    child_flush = Flaky()
                    buf._flush = child_flush
                    buf.incr("g", {"n": 5}, {"id": 2})
                    # Nobody calls process_pending here: only the child's own thread can
                    # deliver this row.
                    if child_flush.done.wait(PATIENCE):
                        rows = [u.columns["n"] for b in child_flush.applied for u in b]
                        flusher.stop()
                        code = 0 if rows == [5] and not flusher.running else 2
                finally:
                    os._exit(code)
        assert wait_child(pid) == 0
        buf.incr("g", {"n": 1}, {"id": 1})
        assert parent_flush.done.wait(PATIENCE)
    finally:
        flusher.stop()
        buf.close()
    assert [u.columns["n"] for b in parent_flush.applied for u in b] == [1]


@pytest.mark.redis
@pytest.mark.parametrize("window", [0, 0.01], ids=["redis", "redis-window"])
def test_system_exit_from_the_callback_on_redis_keeps_the_flusher(redis_server, key_prefix, window):
    flush = Flaky(SystemExit(1))
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    buf = RedisBuffer(
        flush=flush,
        client=client,
        key_prefix=key_prefix,
        delay=0,
        retry_backoff=0.01,
        local_window=window,
    )
    buf.incr("g", {"n": 4}, {"id": 1})
    flusher = updatebuffer.Flusher(buf, interval=0.01).start()
    try:
        assert flush.done.wait(PATIENCE), "the flusher thread died with SystemExit"
        assert flusher.running
    finally:
        flusher.stop()
        buf.close()
        client.close()
    assert isinstance(flusher.last_error, SystemExit)
    assert [attempt for _, attempt in flush.calls] == [1, 2]
    assert [u.columns["n"] for b in flush.applied for u in b] == [4]
