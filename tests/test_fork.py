"""fork() on every backend: the child gets fresh locks and threads, never delivers or pushes the
parent's rows a second time, and loses nothing of its own; exact totals across all processes.

Children made with ``os.fork`` always leave through ``os._exit`` (``try/finally``), so a failing
child can never run the rest of the test session.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter

import pytest
import redis
from fork_helpers import PATIENCE, wait_child

import updatebuffer
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    # Python 3.12+ warns about fork() in a process with threads: these tests fork with threads
    # on purpose.
    pytest.mark.filterwarnings("ignore:This process:DeprecationWarning"),
]


def _totals(updates) -> Counter:
    got: Counter = Counter()
    for u in updates:
        got[u.filters["id"]] += u.columns["n"]
    return got


def _eventually(check) -> bool:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def client(redis_server):
    c = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield c
    c.close()


# ---------------------------------------------------------------------------------------------
# os.fork


@pytest.mark.redis
def test_local_window_child_pushes_its_own_rows_only_and_closes(client, key_prefix):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec, client=client, key_prefix=key_prefix, delay=3600, local_window=0.05
    )
    for _ in range(10):
        buf.incr("g", {"n": 1}, {"id": "parent"})
    window = buf._window
    # Held at fork, as by a push in progress: a child inheriting it locked hung in close().
    with buf._window_lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                for _ in range(7):
                    buf.incr("g", {"n": 1}, {"id": "child"})
                # Nobody but the child's own window thread pushes these.
                pushed = _eventually(
                    lambda: window.stats().pending_rows == 0 and window.stats().in_flight_rows == 0
                )
                buf.close()
                code = 0 if pushed else 2
            finally:
                os._exit(code)
    assert wait_child(pid) == 0
    for _ in range(5):
        buf.incr("g", {"n": 1}, {"id": "parent"})
    buf.drain()
    buf.close()
    assert _totals(rec.updates()) == {"parent": 15, "child": 7}


@pytest.mark.redis
def test_redis_child_and_parent_share_the_rows(client, key_prefix):
    rec = Recorder()
    buf = RedisBuffer(flush=rec, client=client, key_prefix=key_prefix, delay=3600)
    buf.incr("g", {"n": 1}, {"id": 1})  # opens the parent's fast-path connection
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            for _ in range(20):
                buf.incr("g", {"n": 1}, {"id": 1})
            buf.close()
            code = 0
        finally:
            os._exit(code)
    for _ in range(30):
        buf.incr("g", {"n": 1}, {"id": 1})
    assert wait_child(pid) == 0
    buf.drain()
    buf.close()
    assert _totals(rec.updates()) == {1: 51}


# ---------------------------------------------------------------------------------------------
# multiprocessing fork pool under load: the parent keeps producing (and its threads keep
# flushing or pushing) while workers fork, produce and exit.

TASKS, PER_TASK = 12, 300
_shared: dict[str, object] = {}


def _produce(task: int) -> int:
    buf = _shared["buffer"]
    for k in range(PER_TASK):
        buf.incr("g", {"n": 1}, {"id": f"t{task}"}, extra={"k": k})
    if _shared.get("drain_in_task"):
        buf.drain()  # memory: the rows live in this process; deliver them from here
    return os.getpid()


class _ParentLoad:
    def __init__(self, buf) -> None:
        self.buf = buf
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.buf.incr("g", {"n": 1}, {"id": "parent"})
            self.count += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _run_pool() -> set[int]:
    with multiprocessing.get_context("fork").Pool(3) as pool:
        pids = set(pool.map(_produce, range(TASKS), chunksize=1))
        # close + join: workers exit normally (terminate(), which __exit__ calls, kills them).
        pool.close()
        pool.join()
    return pids


def _expected(parent: int) -> dict[str, int]:
    return {"parent": parent, **{f"t{i}": PER_TASK for i in range(TASKS)}}


class _FileSink:
    """A flush callback that appends rows to a file per process (the children's deliveries)."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.parent = os.getpid()
        self.rec = Recorder()

    def __call__(self, batch) -> None:
        if os.getpid() == self.parent:
            self.rec(batch)
            return
        with open(self.directory / f"{os.getpid()}.txt", "a") as out:
            out.writelines(f"{u.filters['id']} {u.columns['n']}\n" for u in batch)

    def children(self) -> Counter:
        got: Counter = Counter()
        for path in self.directory.iterdir():
            for line in path.read_text().splitlines():
                row, n = line.split()
                got[row] += int(n)
        return got


def test_memory_fork_pool_under_load(tmp_path):
    sink = _FileSink(tmp_path)
    buf = MemoryBuffer(flush=sink, delay=0.01)
    _shared.update(buffer=buf, drain_in_task=True)
    try:
        with updatebuffer.Flusher(buf, interval=0.005), _ParentLoad(buf) as load:
            _run_pool()
        buf.close()
    finally:
        _shared.clear()
    parent = _totals(sink.rec.updates())
    children = sink.children()
    # The parent's rows were delivered by the parent only, each child's by that child only.
    assert parent == {"parent": load.count}
    assert children == {f"t{i}": PER_TASK for i in range(TASKS)}


@pytest.mark.redis
@pytest.mark.parametrize("window", [0, 0.005, 30], ids=["no-window", "window-busy", "window-idle"])
def test_redis_fork_pool_under_load(client, key_prefix, window):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec, client=client, key_prefix=key_prefix, delay=3600, local_window=window
    )
    _shared.update(buffer=buf)
    try:
        with _ParentLoad(buf) as load:
            _run_pool()
        buf.drain()
        buf.close()
    finally:
        _shared.clear()
    assert _totals(rec.updates()) == _expected(load.count)


@pytest.mark.redis
@pytest.mark.parametrize("cluster", [False, True], ids=["node", "cluster"])
def test_child_is_not_blocked_by_a_pool_lock_a_parent_thread_held_at_fork(
    request, key_prefix, cluster
):
    """A parent thread inside a redis-py pool call at fork() holds the pool's lock; redis-py
    resets the pool in the child under that lock, so the child's first command hung forever."""
    fixture = "redis_cluster" if cluster else "redis_server"
    server = request.getfixturevalue(fixture)
    buf = RedisBuffer.from_url(server.url, flush=Recorder(), key_prefix=key_prefix, delay=3600)
    buf.incr("g", {"n": 1}, {"id": 1}, {"e": "parent"})  # the pool has a connection now
    client = buf._clients[0]
    if cluster:
        nodes = client.nodes_manager.nodes_cache.values()
        locks = [n.redis_connection.connection_pool._lock for n in nodes] + [client._lock]
    else:
        locks = [client.connection_pool._lock]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:  # another thread: an RLock held by the forking thread would re-enter
        for lock in locks:
            lock.acquire()
        holding.set()
        release.wait(60)
        for lock in reversed(locks):
            lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                buf.incr("g", {"n": 1}, {"id": 2}, {"e": "child"})  # through the pool
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join(30)
    assert wait_child(pid) == 0
    got = buf.get("g", {"id": 2})
    assert got is not None and (dict(got.columns), dict(got.extra)) == ({"n": 1}, {"e": "child"})
    buf.close()
