import os
import threading
import time

import pytest

import updatebuffer
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.testing.contract import BufferContract, Recorder


@pytest.fixture
def make_memory():
    made = []

    def make(flush, **options):
        buf = MemoryBuffer(flush=flush, **options)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


class TestMemoryContract(BufferContract):
    @pytest.fixture
    def make_buffer(self, make_memory):
        return make_memory


def test_from_url_returns_exactly_memory_buffer():
    buf = updatebuffer.from_url("memory://?delay=1.5&batch_size=10", flush=Recorder())
    assert type(buf) is MemoryBuffer
    assert buf.delay == 1.5 and buf.batch_size == 10
    buf.close()


def test_overflow_flush_writes_oldest_rows_inline(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600, max_rows=10, batch_size=4)
    for i in range(25):
        buf.incr("g", {"n": 1}, {"id": i})
    assert buf.stats().pending_rows <= 10
    assert rec.calls, "the calling thread flushed the oldest rows"
    assert [u.filters["id"] for u in rec.calls[0]] == [0, 1, 2, 3]
    buf.drain()
    assert rec.total("n") == 25


def test_overflow_flush_merges_into_existing_rows_without_flushing(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600, max_rows=2)
    for _ in range(10):
        buf.incr("g", {"n": 1}, {"id": 1})
        buf.incr("g", {"n": 1}, {"id": 2})
    assert rec.calls == []


def test_overflow_raise(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600, max_rows=2, overflow="raise")
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.incr("g", {"n": 1}, {"id": 2})
    with pytest.raises(updatebuffer.BufferFullError):
        buf.incr("g", {"n": 1}, {"id": 3})
    buf.incr("g", {"n": 1}, {"id": 1})  # existing rows still merge
    assert buf.stats().updates_accepted == 3
    buf.drain()
    assert rec.total("n") == 3


def test_overflow_block_times_out_then_succeeds_after_flush(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600, max_rows=1, overflow="block", block_timeout=0.1)
    buf.incr("g", {"n": 1}, {"id": 1})
    start = time.monotonic()
    with pytest.raises(updatebuffer.BufferFullError, match="block_timeout"):
        buf.incr("g", {"n": 1}, {"id": 2})
    assert time.monotonic() - start >= 0.09
    buf.block_timeout = 5.0
    done = threading.Event()

    def blocked():
        buf.incr("g", {"n": 1}, {"id": 3})
        done.set()

    t = threading.Thread(target=blocked)
    t.start()
    # Wait until the thread is parked in the buffer's condition (not merely not started yet).
    while not buf._room._waiters:  # type: ignore[attr-defined]  # CPython's Condition
        assert t.is_alive() and not done.is_set(), "incr returned instead of blocking"
        time.sleep(0.001)
    assert not done.is_set()
    buf.drain()
    t.join(5)
    assert done.is_set()
    buf.drain()
    assert rec.total("n") == 2


def test_overflow_flush_waits_when_every_row_is_busy(make_memory):
    # The only pending row waits on a failed batch of the same row; the inline flush has nothing
    # it may claim, so the caller waits (bounded by block_timeout) instead of spinning.
    rec = Recorder(fail_times=1)
    buf = make_memory(rec, delay=3600, max_rows=1, block_timeout=0.1, retry_backoff=3600)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.drain()  # fails, batch kept
    buf.incr("g", {"n": 1}, {"id": 1})  # pending again, busy
    with pytest.raises(updatebuffer.BufferFullError):
        buf.incr("g", {"n": 1}, {"id": 2})
    for _ in range(3):
        buf.drain()
    assert rec.total("n") == 2


def test_close_keeps_failed_rows_and_logs(make_memory, caplog):
    rec = Recorder(fail_times=100)
    buf = make_memory(rec, delay=3600, max_attempts=3)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.close()
    assert "not flushed" in caplog.text
    assert buf.stats().in_flight_rows == 0
    [letter] = buf.dead_letters()
    assert (letter.update.filters, letter.update.columns, letter.attempts) == (
        {"id": 1},
        {"n": 1},
        3,
    )


def test_close_delivers_every_healthy_row_of_a_batch_with_a_bad_row(make_memory):
    # One batch of 20 rows, one of them poisonous, and a backoff close() must not wait for.
    rec = Recorder(poison=(("g", {"id": 13}),))
    buf = make_memory(rec, delay=3600, max_attempts=3, retry_backoff=3600, close_timeout=60)
    for i in range(20):
        buf.incr("g", {"n": i + 1}, {"id": i}, extra={"tag": f"t{i}"})
    buf.close()
    assert sorted((u.filters["id"], u.columns["n"], u.extra["tag"]) for u in rec.updates()) == [
        (i, i + 1, f"t{i}") for i in range(20) if i != 13
    ]
    [letter] = buf.dead_letters()  # still readable after close
    assert (letter.update.filters, letter.update.columns, letter.update.extra) == (
        {"id": 13},
        {"n": 14},
        {"tag": "t13"},
    )
    stats = buf.stats()
    assert (stats.pending_rows, stats.in_flight_rows, stats.dead_letters) == (0, 0, 1)


def test_close_interrupted_by_the_callback_can_be_called_again(make_memory):
    calls = []

    def flush(batch):
        calls.append(batch.attempt)
        if len(calls) == 1:
            raise KeyboardInterrupt

    buf = make_memory(flush, delay=3600, retry_backoff=3600)
    buf.incr("g", {"n": 1}, {"id": 1})
    with pytest.raises(KeyboardInterrupt):
        buf.close()
    with pytest.raises(updatebuffer.UpdateBufferError, match="closed"):
        buf.incr("g", {"n": 1}, {"id": 2})
    buf.close()
    assert calls == [1, 2]
    assert buf.stats().in_flight_rows == 0


def test_close_timeout_bounds_close_while_the_callback_keeps_failing(make_memory):
    rec = Recorder(fail_times=10**9)
    buf = make_memory(rec, delay=3600, max_attempts=10**6, close_timeout=0.2)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.close()  # returns: the rows stay in flight, readable, for a later drain()
    assert buf.stats().in_flight_rows == 1
    rec.fail_times = 0
    assert buf.drain() == 1
    assert rec.total("n") == 1


def test_batch_finishing_wakes_an_incr_waiting_for_room(make_memory):
    # max_rows=1 and the only pending row has older data in a batch being delivered: an incr of
    # a new row can neither add it nor flush the busy row, so it waits. When that batch is
    # acknowledged, the waiting incr must wake, flush the row and go on; before, it slept until
    # block_timeout and raised BufferFullError.
    gate, entered = threading.Event(), threading.Event()
    applied = []

    def flush(batch):
        entered.set()
        gate.wait()
        applied.extend((u.filters["id"], u.columns["n"]) for u in batch)

    buf = make_memory(flush, delay=3600, max_rows=1, block_timeout=30)
    buf.incr("g", {"n": 1}, {"id": 1})
    flusher = threading.Thread(target=buf.drain)
    flusher.start()
    assert entered.wait(60)
    buf.incr("g", {"n": 2}, {"id": 1})  # pending again, its older data in flight
    errors = []

    def produce():
        try:
            buf.incr("g", {"n": 3}, {"id": 2})
        except Exception as exc:  # recorded, asserted below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 60
    while not buf._room._waiters and time.monotonic() < deadline:  # it is waiting now
        time.sleep(0.001)
    assert buf._room._waiters
    gate.set()
    flusher.join(60)
    producer.join(60)
    assert not producer.is_alive()
    assert errors == []
    buf.drain()
    assert sorted(applied) == [(1, 1), (1, 2), (2, 3)]


def test_close_without_drain(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600, drain_on_close=False)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.close()
    assert rec.calls == []


def test_keyboard_interrupt_in_callback_keeps_the_batch(make_memory):
    calls = []

    def flush(batch):
        calls.append(batch)
        if len(calls) == 1:
            raise KeyboardInterrupt

    buf = make_memory(flush, retry_backoff=0)
    buf.incr("g", {"n": 5}, {"id": 1})
    with pytest.raises(KeyboardInterrupt):
        buf.drain()
    assert buf.drain() == 1
    assert calls[1].id == calls[0].id and calls[1].attempt == 2


def test_dead_letter_purge(make_memory):
    rec = Recorder(poison=(("g", {"id": 1}),))
    buf = make_memory(rec, max_attempts=1)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.drain()
    assert buf.stats().dead_letters == 1
    assert buf.purge_dead_letters() == 1
    assert buf.dead_letters() == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_starts_empty_and_does_not_deadlock(make_memory):
    rec = Recorder()
    buf = make_memory(rec, delay=3600)
    buf.incr("g", {"n": 1}, {"id": 1})
    with buf._lock:  # held at fork time: the child must not inherit a locked lock
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 2  # an exception in the child must end the child, never run pytest on
            try:
                ok = buf.stats().pending_rows == 0
                buf.incr("g", {"n": 1}, {"id": 2})
                code = 0 if ok and buf.stats().pending_rows == 1 else 1
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert buf.stats().pending_rows == 1
