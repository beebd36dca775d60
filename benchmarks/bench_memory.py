"""Memory backend ``incr`` throughput against a naive locked dict and direct SQLite writes.

The workload is the seed scenario: a precomputed stream of row ids where 10% of the events hit
one hot row and the rest are uniform over 10,000 rows (fixed seed). Every benchmark replays the
stream one ``incr``-shaped call per event; pyperf reports seconds per event (``inner_loops`` =
events per loop), so ``1 / mean`` is events per second.

Benchmarks (all in one run, so the ratios compare like with like):

- ``memory incr``: ``MemoryBuffer.incr("groups", {"times_seen": 1}, {"id": rid})`` through
  ``updatebuffer.from_url("memory://?delay=3600", flush=noop)``; the buffer is drained (outside the
  timed part) after every loop, so it never grows between loops.
- ``naive locked dict``: the baseline, a dict keyed by ``(model, sorted filters)`` behind a
  ``threading.Lock`` that sums the columns; same call shape.
- ``sqlite direct``: what buffering replaces, one ``UPDATE ... times_seen + 1`` committed per
  event (autocommit) into a temporary SQLite file in WAL mode, ``synchronous=NORMAL``.
- ``memory incr +extra+greatest+least``: the full shape of the demo's calls, for information.

Usage::

    python benchmarks/bench_memory.py -o .bench/memory.json --fast   # or without --fast
    python benchmarks/bench_memory.py --report .bench/memory.json    # incr/s and ratios
    python benchmarks/bench_memory.py --profile-incr                 # cProfile of memory incr
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

import updatebuffer

EVENTS = 100_000
SQLITE_EVENTS = 20_000  # one commit per event is slow: a shorter prefix of the same stream
ROWS = 10_000
HOT_FRACTION = 0.1
HOT_ID = 1
SEED = 20_240_601
BASE_TIMESTAMP = 1_700_000_000.0

MEMORY = "memory incr"
NAIVE = "naive locked dict"
SQLITE = "sqlite direct"
MEMORY_FULL = "memory incr +extra+greatest+least"


def make_events(n: int = EVENTS, seed: int = SEED) -> list[int]:
    rng = random.Random(seed)
    return [HOT_ID if rng.random() < HOT_FRACTION else rng.randint(1, ROWS) for _ in range(n)]


# Module level: every pyperf worker process builds the same stream before timing anything.
IDS = make_events()
STAMPS = [BASE_TIMESTAMP + i * 0.001 for i in range(EVENTS)]


def noop(batch):
    pass


class NaiveBuffer:
    """The simplest correct thread-safe buffer: sum columns per row under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rows = {}

    def incr(self, model, columns, filters, extra=None):
        key = (model, tuple(sorted(filters.items())))
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self._rows[key] = dict(columns)
            else:
                for name, delta in columns.items():
                    row[name] = row.get(name, 0) + delta

    def drain(self):
        with self._lock:
            rows, self._rows = self._rows, {}
        return len(rows)


def time_memory_incr(loops):
    buf = updatebuffer.from_url("memory://?delay=3600", flush=noop)
    ids = IDS
    elapsed = 0.0
    try:
        for _ in range(loops):
            incr = buf.incr
            started = time.perf_counter()
            for rid in ids:
                incr("groups", {"times_seen": 1}, {"id": rid})
            elapsed += time.perf_counter() - started
            buf.drain()
    finally:
        buf.close()
    return elapsed


def time_naive_incr(loops):
    buf = NaiveBuffer()
    ids = IDS
    elapsed = 0.0
    for _ in range(loops):
        incr = buf.incr
        started = time.perf_counter()
        for rid in ids:
            incr("groups", {"times_seen": 1}, {"id": rid})
        elapsed += time.perf_counter() - started
        buf.drain()
    return elapsed


def time_memory_incr_full(loops):
    buf = updatebuffer.from_url("memory://?delay=3600", flush=noop)
    pairs = list(zip(IDS, STAMPS, strict=True))
    elapsed = 0.0
    try:
        for _ in range(loops):
            incr = buf.incr
            started = time.perf_counter()
            for rid, seen in pairs:
                incr(
                    "groups",
                    {"times_seen": 1},
                    {"id": rid},
                    extra={"level": "error"},
                    greatest={"last_seen": seen},
                    least={"first_seen": seen},
                )
            elapsed += time.perf_counter() - started
            buf.drain()
    finally:
        buf.close()
    return elapsed


_sqlite = {}


def _sqlite_connection():
    """Open (once per worker process) a WAL database holding the ``groups`` rows."""
    if "conn" not in _sqlite:
        tmp = tempfile.mkdtemp(prefix="bench-memory-")
        conn = sqlite3.connect(os.path.join(tmp, "bench.sqlite3"), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE groups (id INTEGER PRIMARY KEY, times_seen INTEGER NOT NULL)")
        conn.executemany(
            "INSERT INTO groups (id, times_seen) VALUES (?, 0)", ((i,) for i in range(1, ROWS + 1))
        )

        def cleanup():
            conn.close()
            shutil.rmtree(tmp, ignore_errors=True)

        atexit.register(cleanup)
        _sqlite["conn"] = conn
    return _sqlite["conn"]


def time_sqlite_direct(loops):
    conn = _sqlite_connection()
    execute = conn.execute
    ids = IDS[:SQLITE_EVENTS]
    sql = "UPDATE groups SET times_seen = times_seen + 1 WHERE id = ?"
    elapsed = 0.0
    for _ in range(loops):
        started = time.perf_counter()
        for rid in ids:
            execute(sql, (rid,))  # autocommit: every statement is its own committed transaction
        elapsed += time.perf_counter() - started
    return elapsed


# -- reporting -------------------------------------------------------------------------------


def report(benchmarks, out=sys.stdout):
    """Print events/s per benchmark and the ratios the issue asks about.

    Rates use the median: on a shared VM a few slow outliers inflate the mean.
    """
    # pyperf values are seconds per inner loop, i.e. per event.
    rates = {bench.get_name(): 1.0 / bench.median() for bench in benchmarks}
    spread = {bench.get_name(): (bench.mean(), bench.stdev()) for bench in benchmarks}
    width = max(len(name) for name in rates)
    print(
        f"{'benchmark':<{width}}  {'incr/s':>12}  {'median':>9}  {'mean +- std dev':>18}", file=out
    )
    for name, rate in rates.items():
        mean, stdev = spread[name]
        print(
            f"{name:<{width}}  {rate:>12,.0f}  {1e6 / rate:>6.3f} us  "
            f"{mean * 1e6:>6.3f} +- {stdev * 1e6:.3f} us",
            file=out,
        )
    if MEMORY in rates:
        for other in (NAIVE, SQLITE):
            if other in rates:
                print(f"memory / {other}: {rates[MEMORY] / rates[other]:.2f}x", file=out)
        if MEMORY_FULL in rates:
            print(f"full shape / memory incr: {rates[MEMORY_FULL] / rates[MEMORY]:.2f}x", file=out)


def report_file(path):
    import pyperf

    suite = pyperf.BenchmarkSuite.load(path)
    report(suite.get_benchmarks())


def profile_incr(top=15):
    """cProfile one pass of the ``memory incr`` workload and print the top functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    time_memory_incr(1)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report_file(sys.argv[2])
        return
    if len(sys.argv) == 2 and sys.argv[1] == "--profile-incr":
        profile_incr()
        return

    import pyperf

    runner = pyperf.Runner()
    runner.metadata["description"] = (
        f"{EVENTS:,} events ({HOT_FRACTION:.0%} on one hot row, the rest over {ROWS:,} rows); "
        f"sqlite direct replays the first {SQLITE_EVENTS:,}"
    )
    benches = [
        runner.bench_time_func(MEMORY, time_memory_incr, inner_loops=EVENTS),
        runner.bench_time_func(NAIVE, time_naive_incr, inner_loops=EVENTS),
        runner.bench_time_func(SQLITE, time_sqlite_direct, inner_loops=SQLITE_EVENTS),
        runner.bench_time_func(MEMORY_FULL, time_memory_incr_full, inner_loops=EVENTS),
    ]
    if not runner.args.worker and all(bench is not None for bench in benches):
        print()
        report(benches)


if __name__ == "__main__":
    main()
