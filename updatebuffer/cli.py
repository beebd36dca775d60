"""The ``updatebuffer`` command line (also ``python -m updatebuffer``).

Each subcommand is one ``_add_<name>`` function that adds its parser and sets ``handler`` to the
function running it; :data:`_COMMANDS` lists them, so a new command is one function and one entry.

Commands:

``demo``
    The embedded default end to end: replay a hot-row write storm into SQLite twice, once
    writing every update (``direct://``) and once through the memory buffer (``memory://``) with a
    background :class:`~updatebuffer.Flusher`, then compare the row writes, the wall time and the
    final table contents.

``worker URL --flush pkg.module:function``
    A long-running flusher process for a shared (Redis) buffer; SIGTERM/SIGINT finish the batch
    in hand and exit 0. While the backend is unreachable it retries with capped exponential
    backoff and jitter, logging each failure with a timestamp, and carries on by itself once the
    backend answers again.

``stats URL`` and ``dead list|replay|purge URL``
    Inspect the backlog and the dead letters of a shared buffer.

``worker``, ``stats`` and ``dead`` refuse per-process backends (``memory://``, ``direct://``):
their buffer lives inside the process that created it, which this command cannot reach. Every
user error (bad URL, unknown backend, unreachable server, unimportable flush function) is one
line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import importlib
import inspect
import json
import logging
import math
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import updatebuffer

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["GroupsWriter", "main"]

_Handler = Callable[[argparse.Namespace], int]

log = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``updatebuffer`` command line.

    :param argv: the arguments after the program name; ``None`` reads ``sys.argv[1:]``.
    :return: the exit status (0 success, 1 failure, 130 interrupted).
    :raises SystemExit: ``--help`` and ``--version`` (status 0) and usage errors (status 2), as
        :mod:`argparse` does.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: _Handler = args.handler
    # A worker runs for days: every log line (ours, the library's, the flush function's) needs
    # its time. Installed on the root logger for this call only, so main() leaves no trace when
    # a program or a test calls it in-process.
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(log_handler)
    if previous_level == logging.NOTSET or previous_level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`updatebuffer stats URL | head`): not an error of ours. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        root.removeHandler(log_handler)
        root.setLevel(previous_level)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="updatebuffer",
        description="Absorb hot-row write storms: buffer and merge row updates, write each row "
        "once per flush.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {updatebuffer.__version__}"
    )
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", required=True
    )
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


# -- argument types ------------------------------------------------------------------------------
# argparse turns ArgumentTypeError into "argument --flag: <message>" and exit status 2.


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1, got {text!r}"
        ) from None
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 0.5), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _new_file(text: str) -> Path:
    path = Path(text)
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text} exists; give a path to a new file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(path.parent)!r} does not exist")
    return path


# -- demo ----------------------------------------------------------------------------------------

_HOT_ID = 1
_BASE_TIMESTAMP = 1_700_000_000.0
_TICK = 0.001  # event i happens at _BASE_TIMESTAMP + i * _TICK: deterministic, exactly comparable
_FLUSH_INTERVAL = 0.05
_SCHEMA = (
    "CREATE TABLE {table} ("
    "id INTEGER PRIMARY KEY, times_seen INTEGER NOT NULL, last_seen REAL, first_seen REAL)"
)
_TABLES = {"direct": "groups_direct", "buffered": "groups_buffered"}


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="replay a hot-row write storm into SQLite, with and without the memory buffer",
        description="Replay a write storm into SQLite twice: 'direct' writes and commits every "
        "update (one UPDATE per event), 'buffered' sends the same updates through the memory "
        "buffer, whose background flusher writes each merged row once per batch transaction. "
        "Prints the row writes and wall time of each phase and checks that both tables end up "
        "identical (exit status 1 if not).",
    )
    parser.add_argument(
        "--events",
        type=_positive_int,
        default=200_000,
        metavar="N",
        help="updates to replay (default: %(default)s)",
    )
    parser.add_argument(
        "--hot-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="share of the events that hit the one hot row, id 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--rows",
        type=_positive_int,
        default=10_000,
        metavar="N",
        help="rows in the table; the other events pick one uniformly (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed of the event stream (default: %(default)s)"
    )
    parser.add_argument(
        "--delay",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="memory buffer delay: how long a row merges updates before the background "
        "flusher writes it; the end of the run drains everything regardless. Shorter delays "
        "write rows more often (the memory backend's own default, 0, writes them as fast as "
        "the flusher runs) (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=500,
        metavar="N",
        help="rows per flush callback call, i.e. per transaction (default: %(default)s)",
    )
    parser.add_argument(
        "--synchronous",
        choices=("off", "normal", "full"),
        default="normal",
        help="SQLite PRAGMA synchronous; 'full' fsyncs every commit, which makes the direct "
        "phase much slower (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-db",
        type=_new_file,
        metavar="PATH",
        help="write the SQLite database to this new file and keep it (default: a temporary "
        "file, deleted at exit)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(handler=_run_demo)


class GroupsWriter:
    """A flush callback writing merged ``groups`` updates into SQLite, one transaction per batch.

    Each :class:`~updatebuffer.Update` becomes one ``UPDATE``: ``times_seen`` adds the summed
    delta, ``last_seen`` keeps the greatest and ``first_seen`` the least timestamp (so an old
    update arriving late never moves ``last_seen`` backwards). A batch is written with one
    ``executemany`` inside ``BEGIN``/``COMMIT``; if anything fails the transaction is rolled back
    and the exception propagates, so the buffer delivers the batch again. To make redeliveries
    harmless, also insert ``batch.id`` into a ledger table in the same transaction and skip
    batches already recorded.

    Example::

        conn = sqlite3.connect("app.db", isolation_level=None, check_same_thread=False)
        buf = updatebuffer.from_url("memory://?delay=5", flush=GroupsWriter(conn))
        buf.incr("groups", {"times_seen": 1}, {"id": 42},
                 greatest={"last_seen": now}, least={"first_seen": now})

    :param conn: an SQLite connection opened with ``isolation_level=None`` (this class manages
        the transactions) and ``check_same_thread=False`` (a :class:`~updatebuffer.Flusher`
        calls it from its own thread).
    :param table: the table to write into; it is put into the SQL as is, so it must be a name
        you control, never user input.
    """

    MODEL = "groups"

    def __init__(self, conn: sqlite3.Connection, table: str = "groups") -> None:
        self._conn = conn
        # max()/min() with several arguments return NULL if any is NULL: coalesce keeps whichever
        # side is known, so a NULL column or an update without the timestamp both work.
        self._sql = (
            f"UPDATE {table} SET times_seen = times_seen + :delta, "
            "last_seen = coalesce(max(last_seen, :last_seen), last_seen, :last_seen), "
            "first_seen = coalesce(min(first_seen, :first_seen), first_seen, :first_seen) "
            "WHERE id = :id"
        )
        # The buffer may call us from the Flusher thread and (on overflow) from an incr() caller
        # at the same time; one connection must not interleave two transactions.
        self._lock = threading.Lock()
        #: Transactions committed so far.
        self.transactions = 0

    def __call__(self, batch: updatebuffer.Batch) -> None:
        """Write *batch* in one transaction.

        :raises ValueError: an update is not for the ``groups`` model.
        :raises sqlite3.Error: the write failed; nothing of the batch was committed.
        """
        params: list[dict[str, Any]] = []
        for update in batch:
            if update.model != self.MODEL:
                raise ValueError(f"GroupsWriter writes {self.MODEL!r} rows, got {update.model!r}")
            params.append(
                {
                    "id": update.filters["id"],
                    "delta": update.columns.get("times_seen", 0),
                    "last_seen": update.greatest.get("last_seen"),
                    "first_seen": update.least.get("first_seen"),
                }
            )
        with self._lock:
            if len(params) == 1:
                # One statement in autocommit mode is its own transaction.
                self._conn.execute(self._sql, params[0])
            else:
                self._conn.execute("BEGIN")
                try:
                    self._conn.executemany(self._sql, params)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            self.transactions += 1


class _Progress(Protocol):
    def update(self, n: int, /) -> object: ...

    def close(self) -> None: ...


class _NoProgress:
    def update(self, n: int, /) -> None:
        pass

    def close(self) -> None:
        pass


class _TextProgress:
    """A percentage redrawn on one line (carriage return), for when tqdm is not installed."""

    def __init__(self, total: int, desc: str, stream: TextIO) -> None:
        self._total = total
        self._desc = desc
        self._stream = stream
        self._done = 0
        self._shown = -1

    def update(self, n: int, /) -> None:
        self._done += n
        percent = self._done * 100 // self._total
        if percent != self._shown:
            self._shown = percent
            self._stream.write(
                f"\r{self._desc}: {percent:3d}% ({self._done:,}/{self._total:,} events)"
            )
            self._stream.flush()

    def close(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def _progress(total: int, desc: str, *, enabled: bool) -> _Progress:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm  # optional: the "cli" extra
    except ImportError:
        return _TextProgress(total, desc, sys.stderr)
    return tqdm(total=total, desc=desc, unit="ev", unit_scale=True, file=sys.stderr)


@dataclass(frozen=True)
class _PhaseResult:
    name: str
    events: int
    row_writes: int
    transactions: int
    seconds: float


def _make_events(events: int, hot_fraction: float, rows: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [_HOT_ID if rng.random() < hot_fraction else rng.randint(1, rows) for _ in range(events)]


def _replay(buf: updatebuffer.Buffer, ids: Sequence[int], progress: _Progress) -> None:
    incr = buf.incr
    total = len(ids)
    step = max(1, total // 200)  # progress ticks: cheap enough not to distort the timing
    for start in range(0, total, step):
        stop = min(start + step, total)
        for i in range(start, stop):
            seen = _BASE_TIMESTAMP + i * _TICK
            incr(
                "groups",
                {"times_seen": 1},
                {"id": ids[i]},
                greatest={"last_seen": seen},
                least={"first_seen": seen},
            )
        progress.update(stop - start)


def _run_phase(
    name: str,
    conn: sqlite3.Connection,
    ids: Sequence[int],
    args: argparse.Namespace,
) -> _PhaseResult:
    writer = GroupsWriter(conn, _TABLES[name])
    changes_before = conn.total_changes
    progress = _progress(len(ids), f"{name:>8}", enabled=not args.no_progress)
    started = time.perf_counter()
    try:
        if name == "direct":
            with updatebuffer.from_url("direct://", flush=writer) as buf:
                _replay(buf, ids, progress)
        else:
            buf = updatebuffer.from_url(
                "memory://", flush=writer, delay=args.delay, batch_size=args.batch_size
            )
            # Leaving the Flusher stops it and drains the buffer: the phase ends when every
            # update is committed.
            with buf, updatebuffer.Flusher(buf, interval=_FLUSH_INTERVAL):
                _replay(buf, ids, progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    return _PhaseResult(
        name=name,
        events=len(ids),
        # Counted by SQLite itself: rows changed by this phase's statements.
        row_writes=conn.total_changes - changes_before,
        transactions=writer.transactions,
        seconds=seconds,
    )


def _create_tables(conn: sqlite3.Connection, rows: int, synchronous: str) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("BEGIN")
    for table in _TABLES.values():
        conn.execute(_SCHEMA.format(table=table))
        conn.executemany(
            f"INSERT INTO {table} (id, times_seen) VALUES (?, 0)",
            ((row_id,) for row_id in range(1, rows + 1)),
        )
    conn.execute("COMMIT")


def _compare(conn: sqlite3.Connection, events: int) -> tuple[bool, str]:
    direct, buffered = _TABLES["direct"], _TABLES["buffered"]
    sums = [
        conn.execute(f"SELECT count(*), sum(times_seen) FROM {table}").fetchone()
        for table in (direct, buffered)
    ]
    (rows_d, sum_d), (rows_b, sum_b) = sums
    differing = conn.execute(
        f"SELECT count(*) FROM {direct} AS d JOIN {buffered} AS b USING (id) "
        "WHERE d.times_seen IS NOT b.times_seen OR d.last_seen IS NOT b.last_seen "
        "OR d.first_seen IS NOT b.first_seen"
    ).fetchone()[0]
    if rows_d == rows_b and sum_d == sum_b == events and differing == 0:
        return True, (
            f"OK: both tables hold the same totals: sum(times_seen) = {sum_b:,} in each, "
            f"{rows_b:,} rows equal in times_seen, last_seen and first_seen"
        )
    return False, (
        f"MISMATCH: sum(times_seen) direct {sum_d:,} vs buffered {sum_b:,} (expected "
        f"{events:,}); rows {rows_d:,} vs {rows_b:,}; {differing:,} rows differ"
    )


def _run_demo(args: argparse.Namespace) -> int:
    ids = _make_events(args.events, args.hot_fraction, args.rows, args.seed)
    with tempfile.TemporaryDirectory(prefix="updatebuffer-demo-") as tmp:
        path: Path = args.keep_db or Path(tmp, "demo.sqlite3")
        print(
            f"updatebuffer demo: {args.events:,} events, {args.hot_fraction:.1%} on one hot row, "
            f"the rest spread over {args.rows:,} rows (seed {args.seed})"
        )
        print(
            f"SQLite {path} (WAL, synchronous={args.synchronous}); buffered phase: "
            f"memory://?delay={args.delay:g}&batch_size={args.batch_size}, "
            f"Flusher every {_FLUSH_INTERVAL:g}s",
            flush=True,  # before the progress bar draws on stderr
        )
        try:
            # isolation_level=None: GroupsWriter issues BEGIN/COMMIT itself. The Flusher thread
            # writes through this connection while the main thread waits.
            with closing(
                sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            ) as conn:
                _create_tables(conn, args.rows, args.synchronous)
                results = [_run_phase(name, conn, ids, args) for name in _TABLES]
                ok, verdict = _compare(conn, args.events)
        except (sqlite3.Error, updatebuffer.UpdateBufferError) as exc:
            print(f"updatebuffer demo: error: {exc}", file=sys.stderr)
            return 1
    print()
    _print_summary(results)
    print(verdict)
    if args.keep_db:
        print(f"database kept at {path} (tables {', '.join(_TABLES.values())})")
    return 0 if ok else 1


def _print_summary(results: Sequence[_PhaseResult]) -> None:
    header = ("phase", "updates", "row writes", "transactions", "wall time", "updates/s")
    table = [header] + [
        (
            r.name,
            f"{r.events:,}",
            f"{r.row_writes:,}",
            f"{r.transactions:,}",
            f"{r.seconds:.2f} s",
            f"{r.events / r.seconds:,.0f}" if r.seconds > 0 else "-",
        )
        for r in results
    ]
    widths = [max(len(row[col]) for row in table) for col in range(len(header))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
    direct, buffered = results
    print()
    if buffered.row_writes:
        print(
            f"write reduction: {buffered.events:,} updates -> {buffered.row_writes:,} row writes, "
            f"{direct.row_writes / buffered.row_writes:.1f}x fewer than direct "
            f"({direct.row_writes:,}); {buffered.transactions:,} transactions instead of "
            f"{direct.transactions:,}"
        )
    if buffered.seconds > 0:
        print(
            f"wall time: direct {direct.seconds:.2f} s, buffered {buffered.seconds:.2f} s "
            f"({direct.seconds / buffered.seconds:.1f}x faster, final drain included)"
        )


# -- worker, stats, dead ---------------------------------------------------------------------


class _UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status :attr:`status`."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _load_flush(spec: str) -> updatebuffer.FlushCallback:
    """Import ``pkg.module:function`` (the current directory is importable, as with ``-m``).

    :raises _UserError: the spec is malformed, its import fails or it is not callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise _UserError(f"--flush: expected pkg.module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:  # any error in the user's module: one line
        raise _UserError(f"--flush: cannot import {spec!r}: {_one_line(exc)}") from None
    if not callable(target):
        raise _UserError(f"--flush: {spec!r} is not callable")
    flush: updatebuffer.FlushCallback = target
    return flush


def _refuse_flush(batch: updatebuffer.Batch) -> None:
    # Commands that only inspect a buffer never flush; raising keeps the batch in the backend.
    raise RuntimeError("this command does not flush batches")


def _backend_errors() -> tuple[type[BaseException], ...]:
    """Return the exceptions meaning "the backend could not be reached or refused the request".

    The library wraps driver errors in :class:`~updatebuffer.BackendError`; redis-py's own
    errors are listed too so that one escaping a code path that does not wrap it (building a
    cluster client, say) is still reported as one line rather than a traceback.
    """
    errors: tuple[type[BaseException], ...] = (updatebuffer.BackendError,)
    try:
        import redis.exceptions  # optional: the "redis" extra
    except ImportError:
        return errors
    # RedisClusterException (a cluster client that found no usable node) is not a RedisError.
    return (*errors, redis.exceptions.RedisError, redis.exceptions.RedisClusterException)


def _inspect_errors() -> tuple[type[BaseException], ...]:
    # Anything the library raises while a read-only command talks to the backend.
    return (updatebuffer.UpdateBufferError, *_backend_errors())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (updatebuffer.UpdateBufferError, _UserError)):
        return text
    # A driver's exception: its class name is often the only hint of what went wrong.
    return f"{type(exc).__name__}: {text}"


def _check_shared(url: str) -> None:
    """Refuse a backend whose buffer lives only in the process that creates it.

    ``memory://`` or ``direct://`` opened here would be a new, empty buffer of this process:
    ``stats`` would print zeros and ``worker`` would wait forever for rows that the application's
    own process holds.

    :raises _UserError: the URL selects such a backend.
    :raises UpdateBufferError: the URL or its backend is invalid.
    """
    from updatebuffer.backends.direct import DirectBuffer
    from updatebuffer.backends.memory import MemoryBuffer
    from updatebuffer.registry import backend_name_for_url, load_backend

    name = backend_name_for_url(url)
    cls = load_backend(name)
    if issubclass(cls, (MemoryBuffer, DirectBuffer)):
        raise _UserError(
            f"{name}:// keeps its buffer inside the process that writes to it, out of reach "
            "of this command; use a shared backend such as redis:// (or flush in-process with "
            "updatebuffer.Flusher)"
        )


def _open(url: str, flush: updatebuffer.FlushCallback) -> updatebuffer.Buffer:
    """Open the shared buffer *url*.

    :raises _UserError: a per-process backend, or an invalid URL or option (status 2), or an
        unreachable backend (status 1).
    """
    try:
        _check_shared(url)
        return updatebuffer.from_url(url, flush=flush)
    except updatebuffer.BackendError as exc:
        raise _UserError(_one_line(exc), status=1) from None
    except updatebuffer.UpdateBufferError as exc:
        raise _UserError(_one_line(exc)) from None
    except _backend_errors() as exc:
        raise _UserError(_one_line(exc), status=1) from None


def _reporting(command: str, run: _Handler) -> _Handler:
    """Wrap a command so that a :class:`_UserError` becomes one line on stderr."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except _UserError as exc:
            print(f"updatebuffer {command}: {exc}", file=sys.stderr)
            return exc.status

    return handler


#: Worker backoff while the backend is unreachable: the first retry waits ``--interval`` (at
#: least this long, so ``--interval 0`` cannot spin), each further failure doubles it, up to
#: ``--max-backoff``.
_MIN_BACKOFF = 0.1
_DEFAULT_MAX_BACKOFF = 30.0


def _add_worker(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="flush a shared buffer (Redis) until stopped",
        description="Call process_pending() in a loop, handing due batches to the flush "
        "function. SIGTERM or SIGINT finishes the batch in hand, then exits with status 0. "
        "Run as many workers as you like against one Redis: each batch goes to one of them. "
        "While the backend is unreachable the worker retries with exponential backoff (from "
        "--interval, doubling up to --max-backoff, each wait shortened by a random jitter of "
        "up to half so that many workers do not reconnect in step) and resumes by itself.",
    )
    parser.add_argument("url", help="buffer URL, e.g. redis://127.0.0.1:6379/0?delay=5")
    parser.add_argument(
        "--flush",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the flush callback, e.g. myapp.buffers:flush (imported from the current "
        "directory too)",
    )
    parser.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="sleep when nothing was due; also the first retry delay when the backend is "
        "unreachable (default: %(default)s)",
    )
    parser.add_argument(
        "--max-backoff",
        type=_seconds,
        default=_DEFAULT_MAX_BACKOFF,
        metavar="SECONDS",
        help="longest wait between retries while the backend is unreachable (default: %(default)s)",
    )
    parser.set_defaults(handler=_reporting("worker", _run_worker))


class _Backoff:
    """Capped exponential backoff with jitter, for retrying an unreachable backend."""

    def __init__(self, first: float, cap: float) -> None:
        self._first = max(first, _MIN_BACKOFF)
        self._cap = max(cap, self._first)
        #: Consecutive failures so far.
        self.failures = 0
        self._since = 0.0

    def fail(self, exc: BaseException, what: str) -> float:
        """Record a failure, log it and return the seconds to wait before the next try."""
        if self.failures == 0:
            self._since = time.monotonic()
        self.failures += 1
        nominal = min(self._cap, self._first * 2 ** min(self.failures - 1, 64))
        # "Equal jitter": wait between half and all of the nominal delay, so workers that lost
        # the backend together do not all come back in the same instant.
        wait: float = nominal * random.uniform(0.5, 1.0)
        log.warning(
            "%s failed (%d in a row): %s; retrying in %.2fs (backoff %.2fs, max %.2fs)",
            what,
            self.failures,
            _one_line(exc),
            wait,
            nominal,
            self._cap,
        )
        return wait

    def succeed(self) -> None:
        """Record a success; log the recovery if there were failures."""
        if self.failures:
            log.warning(
                "backend reachable again after %d failed attempts over %.1fs",
                self.failures,
                time.monotonic() - self._since,
            )
            self.failures = 0


def _takes_max_batches(buf: updatebuffer.Buffer) -> bool:
    try:
        return "max_batches" in inspect.signature(buf.process_pending).parameters
    except (TypeError, ValueError):  # a callable without a signature (C extension)
        return False


def _run_worker(args: argparse.Namespace) -> int:
    flush = _load_flush(args.flush)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        log.info("signal %d: finishing the batch in hand, then exiting", signum)
        stop.set()

    backoff = _Backoff(args.interval, args.max_backoff)
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        buf: updatebuffer.Buffer | None = None
        while buf is None and not stop.is_set():
            try:
                buf = _open(args.url, flush)
            except _UserError as exc:  # noqa: PERF203  # a retry loop; each try is a round trip
                if exc.status != 1:  # a configuration mistake: retrying cannot help
                    raise
                stop.wait(backoff.fail(exc, "connecting"))
        if buf is None:
            print("updatebuffer worker: stopped before connecting", flush=True)
            return 0
        flushed = _work(buf, args.interval, stop, backoff)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"updatebuffer worker: stopped after flushing {flushed:,} rows", flush=True)
    return 0


def _work(
    buf: updatebuffer.Buffer, interval: float, stop: threading.Event, backoff: _Backoff
) -> int:
    print(f"updatebuffer worker: flushing {buf!r}; SIGTERM/SIGINT to stop", flush=True)
    # One batch per call where the backend allows it, so a stop request is honoured after the
    # batch in hand rather than after the whole backlog.
    kwargs = {"max_batches": 1} if _takes_max_batches(buf) else {}
    flushed = 0
    try:
        while not stop.is_set():
            try:
                rows = buf.process_pending(**kwargs)
            except _backend_errors() as exc:
                stop.wait(backoff.fail(exc, "process_pending"))
                continue
            backoff.succeed()
            flushed += rows
            if rows == 0:
                stop.wait(interval)
    finally:
        try:
            buf.close()
        except _backend_errors() as exc:
            raise _UserError(f"closing the buffer failed: {_one_line(exc)}", status=1) from None
    return flushed


def _add_stats(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="print a buffer's backlog and totals",
        description="Print pending rows (per partition), the oldest pending age, in-flight and "
        "dead-lettered batches and lifetime totals of a shared buffer.",
    )
    parser.add_argument("url", help="buffer URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_reporting("stats", _run_stats))


def _run_stats(args: argparse.Namespace) -> int:
    try:
        with _open(args.url, _refuse_flush) as buf:
            stats = buf.stats()
    except _inspect_errors() as exc:
        raise _UserError(_one_line(exc), status=1) from None
    data = dataclasses.asdict(stats)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    partitions = data.pop("pending_by_partition")
    width = max(len(name) for name in data)
    for name, value in data.items():
        shown = (
            "-" if value is None else f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"
        )
        print(f"{name.ljust(width)}  {shown}")
    busy = {name: n for name, n in partitions.items() if n}
    if busy:
        print("pending by partition: " + ", ".join(f"{k}={v:,}" for k, v in busy.items()))
    return 0


def _add_dead(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dead",
        help="list, replay or purge dead letters",
        description="Dead letters are rows whose flush failed alone max_attempts times. 'list' "
        "shows them, 'replay' puts them back among the pending rows (after you fixed the cause), "
        "'purge' deletes them.",
    )
    parser.add_argument("action", choices=("list", "replay", "purge"))
    parser.add_argument("url", help="buffer URL, e.g. redis://127.0.0.1:6379/0")
    parser.add_argument("--json", action="store_true", help="'list' prints JSON")
    parser.set_defaults(handler=_reporting("dead", _run_dead))


def _json_value(value: object) -> object:
    if isinstance(value, bytes):
        return {"bytes_hex": value.hex()}
    if isinstance(value, (datetime.date, decimal.Decimal, uuid.UUID)):
        return str(value)
    return value


def _run_dead(args: argparse.Namespace) -> int:
    try:
        with _open(args.url, _refuse_flush) as buf:
            if not isinstance(buf, updatebuffer.DeadLetterStore):
                raise _UserError(f"{buf!r} keeps no dead letters")
            if args.action == "replay":
                print(f"replayed {buf.replay_dead_letters():,} dead letters")
            elif args.action == "purge":
                print(f"purged {buf.purge_dead_letters():,} dead letters")
            else:
                letters = buf.dead_letters()
                rows = [
                    {
                        "batch_id": letter.batch_id,
                        "attempts": letter.attempts,
                        "error": letter.error,
                        "failed_at": letter.failed_at,
                        "model": letter.update.model,
                        "filters": {k: _json_value(v) for k, v in letter.update.filters.items()},
                        "columns": dict(letter.update.columns),
                    }
                    for letter in letters
                ]
                if args.json:
                    print(json.dumps(rows, indent=2, default=str))
                else:
                    for row in rows:
                        print(
                            f"{row['batch_id']}  {row['model']} {row['filters']}  "
                            f"columns={row['columns']}  attempts={row['attempts']}  "
                            f"error={row['error']}"
                        )
                    print(f"{len(rows):,} dead letters")
    except _inspect_errors() as exc:
        raise _UserError(_one_line(exc), status=1) from None
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_demo,
    _add_worker,
    _add_stats,
    _add_dead,
)
