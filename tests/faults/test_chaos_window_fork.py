"""Chaos: ``local_window`` producers in forked processes, and flush workers SIGKILLed meanwhile.

The deployment this copies: a web server builds its buffer (with a local window) at import and
forks its workers (gunicorn ``--preload``), some by ``os.fork`` and some by a ``multiprocessing``
fork context, while the parent keeps buffering from a thread (so the window's lock and thread
are busy at fork time). Each producer ``close()``s its buffer as an orderly exit does. Flush
workers (``_worker.py``, an effectively-once SQLite ledger keyed by batch id) are SIGKILLed
inside the callback and replaced. At the end the ledger must hold exactly every update made:
none lost in a child's window, none pushed twice (a child must not push the parent's rows).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from updatebuffer.backends.redis import RedisBuffer

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]

ROWS = 12
PER_PRODUCER = 300
FORKED = 2  # producers started by os.fork
SPAWNED = 2  # producers started by a multiprocessing fork context
CHILD_PATIENCE = 60.0  # a child that has not exited by then hangs (its close() deadlocked)


def _update(who: int, i: int) -> tuple[int, int]:
    """The *i*-th (row, v) producer *who* buffers, as ``incr("g", {"n": 1, "v": v}, ...)``."""
    return (who * 7 + i) % ROWS, who * 100_000 + i


def _updates(who: int, count: int) -> list[tuple[int, int]]:
    return [_update(who, i) for i in range(count)]


def _produce(buf: RedisBuffer, who: int) -> None:
    for row, v in _updates(who, PER_PRODUCER):
        buf.incr("g", {"n": 1, "v": v}, {"id": row})


def _dump_stacks(pid: int) -> None:
    """Have a hung child print its threads' stacks (to the captured stderr) before it is killed."""
    os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)


def _no_flush(batch):
    raise RuntimeError("producers never flush")


def test_window_producers_in_forked_children_with_workers_killed(
    server, prefix, spawn_worker, ledger_db, load_ledger, tmp_path
):
    common = ["--url", server.url, "--prefix", prefix, "--ledger", str(ledger_db)]
    # Inherited by every child: one that hangs (even inside an at-fork hook) prints all its
    # threads' stacks on SIGUSR1, to the captured stderr, before the test kills it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    buf = RedisBuffer.from_url(
        server.url, flush=_no_flush, key_prefix=prefix, delay=0, local_window=0.02
    )
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    made = 0

    def expect(who: int, count: int) -> None:
        nonlocal made
        for row, v in _updates(who, count):
            t = expected[f"g:{row}"]
            t[0] += 1
            t[1] += 1
            t[2] += v
            made += 1

    # A worker that is SIGKILLed inside its callback: its batch comes back after the lease.
    doomed = spawn_worker(*common, "--pre", "30", "30")

    # The parent buffers from a thread all along, so forks land while its window is busy.
    stop_parent = threading.Event()
    parent_count = 0

    def parent_load() -> None:
        nonlocal parent_count
        while not stop_parent.is_set():
            row, v = _update(0, parent_count)
            buf.incr("g", {"n": 1, "v": v}, {"id": row})
            parent_count += 1

    loader = threading.Thread(target=parent_load, name="parent-load")
    loader.start()
    try:
        while parent_count < 200:
            time.sleep(0.001)

        pids = []
        for k in range(FORKED):
            who = 1 + k
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns into pytest
                code = 1
                try:
                    _produce(buf, who)
                    buf.close()  # pushes the child's own window
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
            expect(who, PER_PRODUCER)

        context = multiprocessing.get_context("fork")
        procs = []
        for k in range(SPAWNED):
            who = 1 + FORKED + k

            def child(who: int = who) -> None:
                _produce(buf, who)
                buf.close()

            proc = context.Process(target=child, name=f"producer-{who}")
            proc.start()
            procs.append(proc)
            expect(who, PER_PRODUCER)

        doomed.wait_for("CB")
        doomed.kill()  # SIGKILL inside the callback, holding a claimed batch
        worker = spawn_worker(*common, "--stop-file", str(tmp_path / "stop"))
        worker.wait_for("READY")

        deadline = time.monotonic() + CHILD_PATIENCE
        hung = []
        for pid in pids:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, f"forked producer {pid} failed"
                    break
                if time.monotonic() > deadline:
                    _dump_stacks(pid)
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung.append(f"os.fork producer {pid}")
                    break
                time.sleep(0.01)
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                _dump_stacks(proc.pid)
                proc.kill()
                proc.join()
                hung.append(f"multiprocessing producer {proc.pid}")
            else:
                assert proc.exitcode == 0, f"multiprocessing producer {proc.pid} failed"
        assert not hung, f"producers that never exited (close() hung after fork): {hung}"
    finally:
        stop_parent.set()
        loader.join()
    expect(0, parent_count)
    buf.close()  # pushes the parent's window

    (tmp_path / "stop").touch()
    worker.proc.wait(timeout=60)
    final = spawn_worker(*common, "--no-loop", "--settle")
    final.wait_for("SETTLED", timeout=120)
    final.finish()

    ledger = load_ledger(ledger_db)
    assert ledger["totals"] == {row: tuple(t) for row, t in expected.items()}
    check = RedisBuffer.from_url(server.url, flush=_no_flush, key_prefix=prefix)
    stats = check.stats()
    check.close()
    assert (stats.pending_rows, stats.in_flight_batches, stats.dead_letters) == (0, 0, 0)
    assert stats.updates_accepted == made
