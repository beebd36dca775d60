"""Fixtures for the fault tests: real redis-server processes, ledgers, producers, workers.

Every test starts its own servers on free 127.0.0.1 ports (never 6379) through
``updatebuffer.testing.servers`` and uses its own key prefix. Nothing here mocks Redis.

Helpers are handed to tests through fixtures (the suite runs with ``--import-mode=importlib``,
where a test module cannot import this conftest).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from updatebuffer.errors import BackendError
from updatebuffer.testing import servers

WORKER = Path(__file__).with_name("_worker.py")

#: Generous bound for anything that should take well under a second on an idle machine.
PATIENCE = 60.0

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    t_start INTEGER NOT NULL,
    t_end INTEGER,
    outcome TEXT,
    rows TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    attempt INTEGER NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_rows (
    batch_id TEXT NOT NULL,
    row TEXT NOT NULL,
    n INTEGER NOT NULL,
    v INTEGER NOT NULL,
    cnt INTEGER NOT NULL,
    PRIMARY KEY (batch_id, row)
);
"""


def row_key(update) -> str:
    return f"{update.model}:{update.filters['id']}"


# ---------------------------------------------------------------------------------------------
# Servers


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses."""
    return f"f{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server():
    """A plain redis-server of this test's own."""
    servers.skip_or_fail_without_redis()
    with servers.RedisServer() as srv:
        yield srv


@pytest.fixture
def aof_server():
    """A redis-server with ``appendonly yes`` and ``appendfsync always``."""
    servers.skip_or_fail_without_redis()
    with servers.RedisServer(appendonly=True) as srv:
        yield srv


@pytest.fixture(scope="session")
def cluster():
    """A Redis Cluster of three masters, shared (tests use distinct key prefixes)."""
    servers.skip_or_fail_without_redis(cluster=True)
    with servers.RedisCluster(masters=3) as c:
        yield c


@contextlib.contextmanager
def frozen(server: servers.RedisServer):
    """SIGSTOP a server (it accepts connections in the kernel but never answers), then SIGCONT."""
    pid = server.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def freeze():
    return frozen


# ---------------------------------------------------------------------------------------------
# Counting what producers did and what the host applied


class Tally:
    """Per row: ``[calls, n, v]`` of incr calls that returned, and of calls that raised."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.errors: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])

    def _add(self, where, row: str, n: int, v: int) -> None:
        with self.lock:
            t = where[row]
            t[0] += 1
            t[1] += n
            t[2] += v

    def ok(self, row: str, n: int, v: int) -> None:
        self._add(self.acked, row, n, v)

    def err(self, row: str, n: int, v: int) -> None:
        self._add(self.errors, row, n, v)

    def acked_calls(self) -> int:
        with self.lock:
            return sum(t[0] for t in self.acked.values())

    def error_calls(self) -> int:
        with self.lock:
            return sum(t[0] for t in self.errors.values())

    def check_exact(self, final: dict[str, tuple[int, int, int]]) -> None:
        """No incr call failed, so the host must hold exactly what was acknowledged."""
        assert self.error_calls() == 0
        expected = {row: tuple(t) for row, t in self.acked.items()}
        assert dict(final) == expected

    def check_bounds(self, final: dict[str, tuple[int, int, int]]) -> None:
        """acknowledged <= applied <= acknowledged + failed, per row and per column.

        An incr that raised BackendError may still have run on the server (the connection
        dropped after the script ran); one that returned must have been applied exactly once.
        """
        rows = set(self.acked) | set(self.errors) | set(final)
        problems = []
        for row in sorted(rows):
            got = final.get(row, (0, 0, 0))
            low = self.acked.get(row, [0, 0, 0])
            extra = self.errors.get(row, [0, 0, 0])
            for name, g, lo, e in zip(("calls", "n", "v"), got, low, extra, strict=True):
                if not lo <= g <= lo + e:
                    problems.append(f"{row} {name}: applied {g}, acked {lo}, failed calls {e}")
        assert not problems, "\n".join(problems[:20])


class Ledger:
    """An in-process effectively-once host: applies each batch id once, records every delivery.

    :param hook: called with ``(ledger, batch)`` at the start of every delivery, before the
        write; it may raise (the delivery then fails) or act on the servers.
    """

    def __init__(self, hook=None) -> None:
        self.hook = hook
        self.lock = threading.Lock()
        self.deliveries: list[tuple[str, int, tuple]] = []
        self.applied: dict[str, dict[str, tuple[int, int, int]]] = {}
        self.skipped: list[tuple[str, int]] = []
        # Broken promises seen inside the callback. An assert there would only fail the delivery
        # (the buffer catches it and redelivers), so they are recorded and checked after the run.
        self.violations: list[str] = []

    def __call__(self, batch) -> None:
        rows = {
            row_key(u): (u.count, int(u.columns.get("n", 0)), int(u.columns.get("v", 0)))
            for u in batch
        }
        with self.lock:
            if len(rows) != len(batch):
                self.violations.append(f"batch {batch.id} holds a row twice")
            self.deliveries.append((batch.id, batch.attempt, tuple(sorted(rows.items()))))
        if self.hook is not None:
            self.hook(self, batch)
        with self.lock:
            if batch.id in self.applied:
                self.skipped.append((batch.id, batch.attempt))
            else:
                self.applied[batch.id] = rows

    def check(self) -> None:
        """Fail with every violation the callback recorded."""
        assert not self.violations, self.violations

    def redeliveries_of_applied(self) -> list[tuple[str, int]]:
        """Every delivery of a batch id after its first one, for batch ids that were applied.

        For a ledger without a failing hook the first delivery of an id is the one applied, so
        these are exactly the deliveries the ledger must have skipped.
        """
        seen: set[str] = set()
        out = []
        with self.lock:
            for batch_id, attempt, _ in self.deliveries:
                if batch_id in seen:
                    out.append((batch_id, attempt))
                elif batch_id in self.applied:
                    seen.add(batch_id)
        return out

    def totals(self) -> dict[str, tuple[int, int, int]]:
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        with self.lock:
            for rows in self.applied.values():
                for row, (c, n, v) in rows.items():
                    t = out[row]
                    t[0] += c
                    t[1] += n
                    t[2] += v
        return {row: tuple(t) for row, t in out.items()}

    def attempts(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = defaultdict(list)
        with self.lock:
            for batch_id, attempt, _ in self.deliveries:
                out[batch_id].append(attempt)
        return dict(out)


@pytest.fixture
def make_tally():
    return Tally


@pytest.fixture
def make_ledger():
    """``make_ledger(hook=None)``; every ledger made is checked for violations at teardown."""
    made: list[Ledger] = []

    def make(hook=None) -> Ledger:
        ledger = Ledger(hook)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.check()


def _settle(buf, *, use_drain: bool = True, timeout: float = PATIENCE, pause: float = 0.02) -> None:
    """Flush until nothing is pending or in flight; tolerate a BackendError now and then."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            flushed = buf.drain() if use_drain else buf.process_pending()
            stats = buf.stats()
        except BackendError as exc:
            last = exc
            time.sleep(0.1)
            continue
        last = stats
        if stats.pending_rows == 0 and stats.in_flight_batches == 0:
            return
        if not flushed:
            time.sleep(pause)
    raise AssertionError(f"buffer did not settle within {timeout:g} s: {last!r}")


@pytest.fixture
def settle():
    return _settle


class Producers:
    """Threads calling ``incr`` in a loop on rows ``g:0 .. g:rows-1`` until stopped.

    Each call adds ``n=1`` and a random ``v``; calls that return are tallied as acknowledged,
    calls that raise :class:`BackendError` as failed (they may or may not have been applied).
    """

    def __init__(
        self, buf, *, threads: int = 2, rows: int = 40, pause: float = 0.001, seed: int = 0
    ) -> None:
        self.buf = buf
        self.tally = Tally()
        self.rows = rows
        self.pause = pause
        self.stop_event = threading.Event()
        self.crashes: list[BaseException] = []
        self.threads = [
            threading.Thread(
                target=self._run, args=(seed * 1000 + i,), name=f"producer-{i}", daemon=True
            )
            for i in range(threads)
        ]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not self.stop_event.is_set():
                i = rng.randrange(self.rows)
                v = rng.randint(1, 1000)
                try:
                    self.buf.incr("g", {"n": 1, "v": v}, {"id": i})
                except BackendError:
                    self.tally.err(f"g:{i}", 1, v)
                    time.sleep(0.01)
                else:
                    self.tally.ok(f"g:{i}", 1, v)
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # surfaced by stop(), never lost in a thread
            self.crashes.append(exc)

    def start(self) -> Producers:
        for t in self.threads:
            t.start()
        return self

    def wait_for_acked(self, count: int, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while self.tally.acked_calls() < count:
            assert not self.crashes, self.crashes
            assert time.monotonic() < deadline, (
                f"producers acknowledged only {self.tally.acked_calls()} calls"
            )
            time.sleep(0.01)

    def stop(self) -> Tally:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=PATIENCE)
            assert not t.is_alive(), f"{t.name} did not stop"
        assert not self.crashes, self.crashes
        return self.tally


@pytest.fixture
def producers():
    made: list[Producers] = []

    def make(buf, **kwargs) -> Producers:
        p = Producers(buf, **kwargs)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop_event.set()
        for t in p.threads:
            t.join(timeout=PATIENCE)


class FlushLoop:
    """A thread calling ``process_pending()`` until stopped, riding out ``BackendError``s."""

    def __init__(self, buf) -> None:
        self.buf = buf
        self.errors: list[BackendError] = []
        self.flushed = 0  # rows flushed so far, to see the loop make progress
        # Anything but a BackendError ends the loop; it is kept so stop() can fail with it
        # (a thread that died quietly looks the same as one that stopped when asked).
        self.crashed: BaseException | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flusher", daemon=True)

    def _step(self) -> None:
        try:
            n = self.buf.process_pending()
            self.flushed += n
            if n == 0:
                time.sleep(0.005)
        except BackendError as exc:
            self.errors.append(exc)
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self._step()
        except BaseException as exc:  # recorded for stop(); re-raising would only print it
            self.crashed = exc

    def wait_for_progress(self, timeout: float = PATIENCE) -> None:
        """Wait until the loop flushes more rows than it had when called (it still works)."""
        start = self.flushed
        deadline = time.monotonic() + timeout
        while self.flushed == start:
            assert self.thread.is_alive(), f"the flush loop died: {self.crashed!r}"
            assert time.monotonic() < deadline, "the flush loop made no progress"
            time.sleep(0.01)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=PATIENCE)
        assert not self.thread.is_alive()
        assert self.crashed is None, f"the flush loop died: {self.crashed!r}"


@pytest.fixture
def flush_loop():
    """``flush_loop(buf)`` starts a FlushLoop; every one is stopped at teardown."""
    made: list[FlushLoop] = []

    def start(buf) -> FlushLoop:
        loop = FlushLoop(buf)
        made.append(loop)
        loop.thread.start()
        return loop

    yield start
    for loop in made:
        loop.stop_event.set()
        loop.thread.join(timeout=PATIENCE)


# ---------------------------------------------------------------------------------------------
# Worker processes (tests/faults/_worker.py)


def init_ledger(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(LEDGER_SCHEMA)
        db.commit()


def read_ledger(path: Path) -> dict:
    """Everything the workers recorded: deliveries in order, applied batches, row totals."""
    with contextlib.closing(sqlite3.connect(path, timeout=PATIENCE)) as db:
        deliveries = db.execute(
            "SELECT id, batch_id, attempt, pid, t_start, t_end, outcome, rows"
            " FROM deliveries ORDER BY id"
        ).fetchall()
        batches = dict(db.execute("SELECT batch_id, attempt FROM batches").fetchall())
        totals = {
            row: (cnt, n, v)
            for row, cnt, n, v in db.execute(
                "SELECT row, SUM(cnt), SUM(n), SUM(v) FROM batch_rows GROUP BY row"
            ).fetchall()
        }
    return {"deliveries": deliveries, "batches": batches, "totals": totals}


class Worker:
    """One ``_worker.py`` process; its stdout lines are read by a thread into a queue."""

    def __init__(self, args: list[str], log_dir: Path, n: int) -> None:
        self.stderr_path = log_dir / f"worker-{n}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name=f"worker-{n}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for raw in stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def wait_for(self, *kinds: str, timeout: float = PATIENCE) -> list[str]:
        """Return the next stdout line whose first word is one of *kinds*, split into words."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"worker {self.pid} printed no {kinds} in {timeout:g} s:\n{self.stderr()}"
                )
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=PATIENCE)
                raise AssertionError(
                    f"worker {self.pid} exited ({self.proc.returncode}) before printing"
                    f" {kinds}:\n{self.stderr()}"
                )
            self.seen.append(line)
            words = line.split()
            if words and words[0] in kinds:
                return words

    def count(self, kind: str) -> int:
        """How many lines starting with *kind* were printed so far (drains the queue)."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            self.seen.append(line)
        return sum(1 for line in self.seen if line.split()[:1] == [kind])

    def kill(self) -> None:
        """SIGKILL the worker (only this pid) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=PATIENCE)
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.stderr())

    def finish(self, timeout: float = 120.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} did not finish in {timeout:g} s:\n{self.stderr()}"
            ) from None
        assert code == 0, f"worker {self.pid} exited {code}:\n{self.stderr()}"
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=PATIENCE)
        self._reader.join(timeout=PATIENCE)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def spawn_worker(tmp_path):
    """``spawn_worker(*args) -> Worker``; every worker is killed (by pid) at teardown."""
    made: list[Worker] = []

    def spawn(*args: str) -> Worker:
        w = Worker(list(args), tmp_path, len(made))
        made.append(w)
        return w

    yield spawn
    for w in made:
        w.close()


@pytest.fixture
def ledger_db(tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    init_ledger(path)
    return path


@pytest.fixture
def load_ledger():
    return read_ledger
