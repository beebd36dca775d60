"""Redis backend against a Sentry-style RedisBuffer baseline, on a real redis-server.

The script starts its own ``redis-server`` on a free 127.0.0.1 port (in the pyperf parent process
only) and passes the port to the pyperf worker processes with ``--redis-port``. Every loop starts
from an empty database (``FLUSHDB`` on that throwaway server, outside the timed part).

The workload is the seed scenario of ``bench_memory.py``: a precomputed stream of row ids where
10% of the events hit one hot row and the rest are uniform over 10,000 rows (fixed seed).

Benchmarks (all in one run, so the ratios compare like with like):

- ``sentry incr`` (a, baseline): per event one redis-py pipeline (``transaction=False``) of
  ``HSETNX m``, ``HSETNX f <json filters>``, ``HINCRBY i+times_seen 1``, ``EXPIRE key 3600`` and
  ``ZADD b:p <now> key``, the key ``b:k:<model>:<md5 of the filters>``, like Sentry's
  ``RedisBuffer.incr`` (src/sentry/buffer/redis.py) on a Redis Cluster (JSON, not pickle).
  Replays the first ``SYNC_EVENTS`` events of the stream.
- ``updatebuffer incr`` (b): ``buf.incr("groups", {"times_seen": 1}, {"id": rid})`` through
  ``updatebuffer.from_url("redis://...?delay=3600&key_prefix=bench", flush=...)``; same events.
- ``updatebuffer local_window incr+push`` (c): the same calls with ``local_window=0.5`` over the
  whole 100,000-event stream, timed until ``close()`` returned, i.e. including pushing every
  merged row to Redis. ``updatebuffer local_window incr only`` times the ``incr`` loop alone
  (rows merged but possibly not pushed yet), for information.
- ``sentry drain`` (d, baseline): the stream aggregated into its ~10,000 distinct rows is written
  the Sentry way (pipelined, not timed); then ``ZRANGE b:p 0 -1`` and, per key, one
  ``MULTI; HGETALL; ZREM; DEL; EXEC`` round trip, the row decoded like Sentry's ``process`` and
  handed to a no-op. (Sentry also takes and releases a per-key lock, two more round trips per
  row; the baseline leaves them out.)
- ``updatebuffer drain`` (e): the same rows written with ``incr`` (through a local window pushed
  in bulk, not timed), then ``buf.drain()`` into a flush callback handing every row to the same
  no-op.

pyperf reports seconds per event (incr benchmarks) or per row (drain benchmarks), so
``1 / time`` is incr/s or rows/s (the report uses the median).

Usage::

    python benchmarks/bench_redis.py --fast -o .bench/redis.json
    python benchmarks/bench_redis.py --report .bench/redis.json      # rates and ratios
    python benchmarks/bench_redis.py --profile updatebuffer-incr     # cProfile + server stats

CPU placement matters on a small machine: add ``--redis-cpu 1 --affinity 0`` to keep the server
and the benchmark on different CPUs, or ``--redis-cpu 0 --affinity 0`` to share one (see
``benchmarks/README.md``). ``UPDATEBUFFER_REDIS_SERVER`` selects the ``redis-server`` binary
when it is not on ``PATH``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import random
import sys
import time
from collections import Counter

import redis

import updatebuffer
from updatebuffer.testing.servers import RedisServer

EVENTS = 100_000
SYNC_EVENTS = 20_000  # one round trip per event: a prefix of the same stream keeps a loop ~1 s
ROWS = 10_000
HOT_FRACTION = 0.1
HOT_ID = 1
SEED = 20_240_601
LOCAL_WINDOW = 0.5
KEY_PREFIX = "bench"

SENTRY_INCR = "sentry incr"
UB_INCR = "updatebuffer incr"
UB_WINDOW = "updatebuffer local_window incr+push"
UB_WINDOW_ONLY = "updatebuffer local_window incr only"
SENTRY_DRAIN = "sentry drain"
UB_DRAIN = "updatebuffer drain"
INCR_BENCHES = (SENTRY_INCR, UB_INCR, UB_WINDOW, UB_WINDOW_ONLY)

# Sentry-shaped names: a model class `sentry.models.group.Group` whose `_meta` is `sentry.group`.
SENTRY_MODEL_PATH = "sentry.models.group.Group"
SENTRY_MODEL_META = "sentry.group"
SENTRY_PENDING = "b:p"
SENTRY_EXPIRE = 3600


def make_events(n: int = EVENTS, seed: int = SEED) -> list[int]:
    rng = random.Random(seed)
    return [HOT_ID if rng.random() < HOT_FRACTION else rng.randint(1, ROWS) for _ in range(n)]


# Module level: every pyperf worker process builds the same stream before timing anything.
IDS = make_events()
SYNC_IDS = IDS[:SYNC_EVENTS]
# The drain benchmarks start from the whole stream merged into its distinct rows.
ROW_COUNTS = sorted(Counter(IDS).items())
DRAIN_ROWS = len(ROW_COUNTS)


def noop_row(*row):
    pass


def noop_flush(batch):
    for update in batch:
        noop_row(update)


# -- the Sentry-style baseline ----------------------------------------------------------------
# Sentry's RedisBuffer (src/sentry/buffer/redis.py), reduced to what touches Redis: the key is
# md5 over "k=<force_bytes(v)!r>" pairs sorted by name, filters are stored as JSON (the Redis
# Cluster branch; the rb branch pickles), values dumped as (type, str) pairs.


def _sentry_coerce(value):
    return str(value).encode("utf-8", "replace")


def sentry_key(filters):
    digest = hashlib.md5(
        "&".join(f"{k}={_sentry_coerce(v)!r}" for k, v in sorted(filters.items())).encode("utf-8")
    ).hexdigest()
    return f"b:k:{SENTRY_MODEL_META}:{digest}"


def _sentry_dump_value(value):
    if isinstance(value, str):
        return "s", value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(type(value))
    return ("i" if isinstance(value, int) else "f"), str(value)


def _sentry_load_value(payload):
    kind, value = payload
    if kind == "s":
        return value
    if kind == "i":
        return int(value)
    if kind == "f":
        return float(value)
    raise TypeError(f"invalid type: {kind}")


def sentry_incr(client, columns, filters):
    key = sentry_key(filters)
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(key, "m", SENTRY_MODEL_PATH)
    pipe.hsetnx(key, "f", json.dumps({k: _sentry_dump_value(v) for k, v in filters.items()}))
    for column, amount in columns.items():
        pipe.hincrby(key, "i+" + column, amount)
    pipe.expire(key, SENTRY_EXPIRE)
    pipe.zadd(SENTRY_PENDING, {key: time.time()})
    pipe.execute()


def sentry_process(client, key):
    """Sentry's ``_process_single_incr`` without the per-key lock: one MULTI round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(key)
    pipe.zrem(SENTRY_PENDING, key)
    pipe.delete(key)
    values = pipe.execute()[0]
    if not values:
        return 0
    values = {k.decode(): v for k, v in values.items()}
    model = values.pop("m").decode()
    filters = {k: _sentry_load_value(v) for k, v in json.loads(values.pop("f").decode()).items()}
    incr_values = {}
    extra_values = {}
    signal_only = None
    for k, v in values.items():
        if k.startswith("i+"):
            incr_values[k[2:]] = int(v)
        elif k.startswith("e+"):
            extra_values[k[2:]] = _sentry_load_value(json.loads(v.decode()))
        elif k == "s":
            signal_only = bool(int(v))
    noop_row(model, incr_values, filters, extra_values, signal_only)
    return 1


def sentry_drain(client):
    keys = client.zrange(SENTRY_PENDING, 0, -1)
    rows = 0
    for key in keys:
        rows += sentry_process(client, key.decode())
    return rows


def sentry_prefill(client, row_counts):
    """Write the rows the Sentry way, many events per pipeline (setup, never timed)."""
    now = time.time()
    for start in range(0, len(row_counts), 1000):
        pipe = client.pipeline(transaction=False)
        for rid, n in row_counts[start : start + 1000]:
            key = sentry_key({"id": rid})
            pipe.hsetnx(key, "m", SENTRY_MODEL_PATH)
            pipe.hsetnx(key, "f", json.dumps({"id": _sentry_dump_value(rid)}))
            pipe.hincrby(key, "i+times_seen", n)
            pipe.expire(key, SENTRY_EXPIRE)
            pipe.zadd(SENTRY_PENDING, {key: now})
        pipe.execute()


# -- per-worker state -------------------------------------------------------------------------

_state: dict[str, object] = {}


def _port():
    return _state["port"]


def _client():
    if "client" not in _state:
        _state["client"] = redis.Redis(host="127.0.0.1", port=_port(), db=0)
    return _state["client"]


def _url(**query):
    options = {"delay": 3600, "key_prefix": KEY_PREFIX, **query}
    qs = "&".join(f"{k}={v}" for k, v in options.items())
    return f"redis://127.0.0.1:{_port()}/0?{qs}"


def _buffer():
    if "buffer" not in _state:
        _state["buffer"] = updatebuffer.from_url(_url(), flush=noop_flush)
    return _state["buffer"]


def _flushdb():
    _client().flushdb()


# -- timed functions --------------------------------------------------------------------------

# Set by --profile: called right around every timed region, so setup stays out of the profile.
_probe = None


class _Clock:
    """Accumulates the time spent inside ``with clock:`` blocks."""

    def __init__(self):
        self.elapsed = 0.0
        self._started = 0.0

    def __enter__(self):
        if _probe is not None:
            _probe.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed += time.perf_counter() - self._started
        if _probe is not None:
            _probe.stop()


def time_sentry_incr(loops):
    client = _client()
    ids = SYNC_IDS
    clock = _Clock()
    for _ in range(loops):
        _flushdb()
        with clock:
            for rid in ids:
                sentry_incr(client, {"times_seen": 1}, {"id": rid})
    _flushdb()
    return clock.elapsed


def time_ub_incr(loops):
    buf = _buffer()
    ids = SYNC_IDS
    clock = _Clock()
    for _ in range(loops):
        _flushdb()
        incr = buf.incr
        with clock:
            for rid in ids:
                incr("groups", {"times_seen": 1}, {"id": rid})
    _flushdb()
    return clock.elapsed


def _time_window(loops, *, include_push):
    ids = IDS
    clock = _Clock()
    for _ in range(loops):
        _flushdb()
        buf = updatebuffer.from_url(_url(local_window=LOCAL_WINDOW), flush=noop_flush)
        incr = buf.incr
        with clock:
            for rid in ids:
                incr("groups", {"times_seen": 1}, {"id": rid})
            if include_push:
                buf.close()  # returns once every merged row left in the window is in Redis
        buf.close()
    _flushdb()
    return clock.elapsed


def time_ub_window(loops):
    return _time_window(loops, include_push=True)


def time_ub_window_incr_only(loops):
    return _time_window(loops, include_push=False)


def time_sentry_drain(loops):
    client = _client()
    clock = _Clock()
    for _ in range(loops):
        _flushdb()
        sentry_prefill(client, ROW_COUNTS)
        with clock:
            rows = sentry_drain(client)
        if rows != DRAIN_ROWS:
            raise RuntimeError(f"sentry drain flushed {rows} rows, expected {DRAIN_ROWS}")
    _flushdb()
    return clock.elapsed


def ub_prefill(row_counts):
    """Write the rows with ``incr`` through a local window, pushed in bulk (setup, never timed).

    Redis then holds what one synchronous ``incr`` per row would leave, in a fraction of the time.
    """
    with updatebuffer.from_url(_url(local_window=3600), flush=noop_flush) as filler:
        for rid, n in row_counts:
            filler.incr("groups", {"times_seen": n}, {"id": rid})


def time_ub_drain(loops):
    buf = _buffer()
    clock = _Clock()
    for _ in range(loops):
        _flushdb()
        ub_prefill(ROW_COUNTS)
        with clock:
            rows = buf.drain()
        if rows != DRAIN_ROWS:
            raise RuntimeError(f"updatebuffer drain flushed {rows} rows, expected {DRAIN_ROWS}")
    _flushdb()
    return clock.elapsed


BENCHES = {
    # name: (time function, inner loops = events or rows per loop)
    SENTRY_INCR: (time_sentry_incr, SYNC_EVENTS),
    UB_INCR: (time_ub_incr, SYNC_EVENTS),
    UB_WINDOW: (time_ub_window, EVENTS),
    UB_WINDOW_ONLY: (time_ub_window_incr_only, EVENTS),
    SENTRY_DRAIN: (time_sentry_drain, DRAIN_ROWS),
    UB_DRAIN: (time_ub_drain, DRAIN_ROWS),
}


# -- reporting --------------------------------------------------------------------------------

RATIOS = (
    ("(b)/(a) sync incr", UB_INCR, SENTRY_INCR, 1.5),
    ("(c)/(a) local_window incr+push", UB_WINDOW, SENTRY_INCR, None),
    ("(e)/(d) drain", UB_DRAIN, SENTRY_DRAIN, 5.0),
)


def report(benchmarks, out=sys.stdout):
    """Print incr/s or rows/s per benchmark and the ratios the issue asks about.

    Rates use the median: on a shared VM a few slow outliers inflate the mean.
    """
    # pyperf values are seconds per inner loop, i.e. per event or per row.
    rates = {bench.get_name(): 1.0 / bench.median() for bench in benchmarks}
    spread = {
        bench.get_name(): (bench.mean(), bench.stdev() if bench.get_nvalue() > 1 else 0.0)
        for bench in benchmarks
    }
    width = max(len(name) for name in rates)
    print(
        f"{'benchmark':<{width}}  {'rate':>10}  {'unit':<6}  {'median':>9}  "
        f"{'mean +- std dev':>19}",
        file=out,
    )
    for name, rate in rates.items():
        unit = "incr/s" if name in INCR_BENCHES else "rows/s"
        mean, stdev = spread[name]
        print(
            f"{name:<{width}}  {rate:>10,.0f}  {unit:<6}  {1e6 / rate:>6.2f} us  "
            f"{mean * 1e6:>7.2f} +- {stdev * 1e6:.2f} us",
            file=out,
        )
    for label, new, old, target in RATIOS:
        if new in rates and old in rates:
            ratio = rates[new] / rates[old]
            goal = "" if target is None else f"  (target >= {target}x: {_met(ratio >= target)})"
            print(f"{label}: {ratio:.2f}x{goal}", file=out)
    if UB_WINDOW in rates:
        rate = rates[UB_WINDOW]
        print(f"local_window incr+push >= 100,000 incr/s: {_met(rate >= 100_000)}", file=out)


def _met(ok):
    return "met" if ok else "NOT met"


def report_file(path):
    import pyperf

    suite = pyperf.BenchmarkSuite.load(path)
    report(suite.get_benchmarks())


# -- profiling --------------------------------------------------------------------------------

PROFILES = {
    "sentry-incr": SENTRY_INCR,
    "updatebuffer-incr": UB_INCR,
    "local-window": UB_WINDOW,
    "sentry-drain": SENTRY_DRAIN,
    "updatebuffer-drain": UB_DRAIN,
}


def _server_cpu(server):
    info = server.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _commandstats(server):
    """``INFO commandstats`` as {command: (calls, usec)}."""
    stats = {}
    for field, value in server.info("commandstats").items():
        parts = dict(item.split("=", 1) for item in value.split(","))
        stats[field.removeprefix("cmdstat_")] = (int(parts["calls"]), int(parts["usec"]))
    return stats


class _Probe:
    """cProfile and ``INFO commandstats`` deltas over the timed regions only."""

    def __init__(self, server):
        self.server = server
        self.profiler = cProfile.Profile()
        self.commands: Counter[str] = Counter()
        self.usec: Counter[str] = Counter()
        self._before = {}
        self._cpu_before = 0.0
        self.server_cpu = 0.0  # seconds of redis-server CPU (user + sys), network I/O included

    def start(self):
        self._before = _commandstats(self.server)
        self._cpu_before = _server_cpu(self.server)
        self.profiler.enable()

    def stop(self):
        self.profiler.disable()
        self.server_cpu += _server_cpu(self.server) - self._cpu_before
        for command, (calls, usec) in _commandstats(self.server).items():
            old_calls, old_usec = self._before.get(command, (0, 0))
            self.commands[command] += calls - old_calls
            self.usec[command] += usec - old_usec


def profile(name, *, redis_cpu=None, client_cpu=None, top=20):
    """Run one loop of a benchmark; print client hot spots (cProfile) and server command time."""
    global _probe
    time_func, inner = BENCHES[PROFILES[name]]
    with RedisServer() as server:
        _pin(server, redis_cpu)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        _state["port"] = server.port
        plain = time_func(1)  # also warms up: connections, script cache
        _probe = probe = _Probe(server)
        try:
            profiled = time_func(1)
        finally:
            _probe = None
    print(
        f"{PROFILES[name]}: {inner / plain:,.0f}/s without the profiler, "
        f"{inner / profiled:,.0f}/s under cProfile ({inner:,} per loop)"
    )
    pstats.Stats(probe.profiler).sort_stats("tottime").print_stats(top)
    print(
        f"redis-server CPU in the timed region: {probe.server_cpu * 1e6 / inner:.2f} us/op "
        "(user + sys, parsing and network I/O included)"
    )
    print(
        "server command time in the timed region (EVALSHA includes the commands its script calls):"
    )
    for command, usec in probe.usec.most_common():
        calls = probe.commands[command]
        if calls > 0 and command != "info":  # the probe's own calls
            print(
                f"  {command:<14} calls={calls:>8,}  per op={calls / inner:6.2f}  "
                f"usec/call={usec / calls:7.2f}  usec/op={usec / inner:7.2f}"
            )


# -- main -------------------------------------------------------------------------------------


def _pin(server, cpu):
    if cpu is not None:
        os.sched_setaffinity(server.pid, {cpu})


def _add_worker_args(cmd, args):
    cmd.extend(("--redis-port", str(args.redis_port)))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report_file(sys.argv[2])
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "--profile":
        parser = argparse.ArgumentParser(prog="bench_redis.py --profile")
        parser.add_argument("--profile", choices=sorted(PROFILES), required=True)
        parser.add_argument("--redis-cpu", type=int, default=None)
        parser.add_argument("--client-cpu", type=int, default=None)
        args = parser.parse_args()
        profile(args.profile, redis_cpu=args.redis_cpu, client_cpu=args.client_cpu)
        return

    import pyperf

    # Fewer processes than pyperf's default 20: a loop takes ~1 s, and the spread comes from
    # Redis and the scheduler, not from hash randomization.
    runner = pyperf.Runner(processes=10, add_cmdline_args=_add_worker_args)
    runner.argparser.add_argument(
        "--redis-port", type=int, default=None, help="internal: the server's port, for workers"
    )
    runner.argparser.add_argument(
        "--redis-cpu", type=int, default=None, help="pin the redis-server process to this CPU"
    )
    args = runner.parse_args()
    server = None
    if not args.worker:
        # Only the parent starts the server; workers get its port on their command line.
        server = RedisServer().start()
        _pin(server, args.redis_cpu)
        args.redis_port = server.port
        runner.metadata["redis_server"] = server.info("server").get("redis_version", "?")
        runner.metadata["redis_cpu"] = "any" if args.redis_cpu is None else str(args.redis_cpu)
        runner.metadata["description"] = (
            f"seed workload: {HOT_FRACTION:.0%} of events on one hot row, the rest over "
            f"{ROWS:,} rows; sync incr replays the first {SYNC_EVENTS:,} events, local_window "
            f"all {EVENTS:,}; drains start from the {DRAIN_ROWS:,} distinct rows"
        )
    elif args.redis_port is None:
        raise SystemExit("pyperf worker started without --redis-port")
    _state["port"] = args.redis_port
    try:
        benches = [
            runner.bench_time_func(name, func, inner_loops=inner)
            for name, (func, inner) in BENCHES.items()
        ]
    finally:
        if server is not None:
            server.stop()
    if not args.worker and all(bench is not None for bench in benches):
        print()
        report(benches)


if __name__ == "__main__":
    main()
