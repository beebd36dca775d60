"""Redis backend: one node, several independent nodes through a partition router, or a cluster.

Every ``incr`` is one Lua script call (one round trip, atomic, all merge operators server-side).
Rows live in hashes; each partition keeps a pending sorted set scored by the row's first
buffered time (server clock). A flush *claims* due rows into an in-flight batch with a lease in
one script, calls the host's callback, and deletes the batch only after the callback returned.
A failed batch is redelivered with the same id after a backoff; a batch whose lease expired
(its worker died) is redelivered unchanged; a batch failing ``max_attempts`` times is split to
isolate failing rows, and rows failing alone become dead letters kept in Redis until replayed
or purged. No TTL ever deletes unflushed data.

Key layout (``<prefix>:<version>:{<tag>}`` = one partition's *base*; the hash tag keeps every
key a script touches in one Redis Cluster slot)::

    <base>:<model>:<digest>      row hash (c: a column's sum -- int text, or float text with a
                                 '.' or an exponent -- or ~e/~g/~l when extra/greatest/least
                                 owns the name; e: extra, g:/G: greatest, l:/L: least,
                                 _k canonical row key, _n count, _f first buffered ms, _sn count
                                 of signal-only updates: the row is signal-only when _sn == _n)
    <base>:~pending              zset member "<model>:<digest>", score first buffered ms
    <base>:~f:<model>:<digest>   a claimed row hash until its batch is acknowledged (at most one
                                 per row: a row whose older data is in flight is not claimed)
    <base>:~leases / ~retry      zsets of batch ids: lease expiry / retry time (ms)
    <base>:~b:<id>               batch record (attempt, n, members, ...); :~b:<id>:1 the row of
                                 a dead letter
    <base>:~dead                 zset of dead-lettered batch ids
    <base>:~stats                lifetime totals
"""

from __future__ import annotations

import atexit
import datetime
import decimal
import logging
import os
import re
import ssl
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import urlsplit

from typing_extensions import Self

from updatebuffer._retry import DeadLetter, backoff_delay
from updatebuffer._validate import (
    _FAST_TAGS,
    INT64_MAX,
    INT64_MIN,
    Operations,
    check_operations,
    conflicting_operations,
    require_filters,
)
from updatebuffer.buffer import _Closeable
from updatebuffer.codec import decode_value, encode_value, type_name
from updatebuffer.config import Option, boolean, count, duration, mask_url, parse_options, text
from updatebuffer.errors import (
    BackendError,
    ConfigurationError,
    InvalidUpdateError,
    MissingDependencyError,
    UpdateBufferError,
)
from updatebuffer.keys import (
    KEY_VERSION,
    check_name,
    decode_row,
    encode_row,
    readable_model,
    row_digest,
)
from updatebuffer.registry import make_router
from updatebuffer.routing import PartitionRouter
from updatebuffer.update import (
    Batch,
    BufferStats,
    FlushCallback,
    Update,
    _unchecked_update,
    merge_updates,
)

try:
    import redis
    import redis.cluster
    import redis.exceptions
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised by the registry tests in a subprocess
    raise MissingDependencyError("redis", "redis", f"import redis failed: {exc}") from exc

if TYPE_CHECKING:
    from redis.commands.core import Script

    from updatebuffer._types import Number, Value
    from updatebuffer.backends.memory import MemoryBuffer
    from updatebuffer.flusher import Flusher

__all__ = ["RedisBuffer"]

log = logging.getLogger(__name__)

_SCRIPTS = ("incr", "claim", "reclaim", "ack", "fail", "replay", "purge", "get")
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-]+$")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICRO = datetime.timedelta(microseconds=1)
# Keys a host config may carry in Sentry-style `hosts={0: {...}}`.
_HOST_KEYS = {
    "host",
    "port",
    "db",
    "password",
    "username",
    "unix_socket_path",
    "ssl",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "socket_timeout",
    "socket_connect_timeout",
    "protocol",
}

# RedisClusterException (no cluster at the URL, no reachable node) is no RedisError.
_REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)

AnyRedis = Any  # redis.Redis | redis.cluster.RedisCluster; redis-py's generics vary by version


def _load_sources() -> dict[str, str]:
    """Return each script with lib.lua's helpers inserted at its ``-- @lib`` line, or on top."""
    folder = resources.files("updatebuffer.backends").joinpath("lua")
    lib = folder.joinpath("lib.lua").read_text(encoding="utf-8")
    sources = {}
    for name in _SCRIPTS:
        text = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        head, marker, tail = text.partition("\n-- @lib")
        sources[name] = f"{head}\n{lib}\n-- @lib{tail}" if marker else f"{lib}\n{text}"
    return sources


_SOURCES = _load_sources()


# Order keys: a family byte, then bytes whose bytewise order is Python's order within the family
# (lib.lua compares them bytewise only). Numbers (int, float, Decimal) are one family compared
# by exact value, like Python compares them: sign byte, then for a non-zero value its decimal
# exponent (fixed width, biased) and its significant digits; a negative value inverts every byte
# of its magnitude's key (terminated, so a shorter digit string cannot be a prefix), so larger
# magnitudes sort lower. Equal values (0, -0.0, Decimal("0.00"); 1, 1.0, Decimal("1.0")) get
# equal keys, so the held value stays, as in Python, where only a strictly greater one replaces.
_NEGATIVE, _ZERO, _POSITIVE = b"\x00", b"\x01", b"\x02"
_EXPONENT = struct.Struct(">Q")
_EXPONENT_BIAS = 2**63
_INVERT = bytes(range(255, -1, -1))


def _magnitude_key(negative: bool, digits: str, adjusted: int) -> bytes:
    # digits: no leading or trailing zeros; adjusted: the exponent of the first digit.
    body = _EXPONENT.pack(adjusted + _EXPONENT_BIAS) + digits.encode("ascii")
    if negative:
        return _NEGATIVE + (body + b"\x00").translate(_INVERT)
    return _POSITIVE + body


def _int_key(n: int) -> bytes:
    if n == 0:
        return _ZERO
    try:
        text = str(abs(n))
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return _decimal_key(decimal.Decimal(n))
    return _magnitude_key(n < 0, text.rstrip("0"), len(text) - 1)


def _decimal_key(d: decimal.Decimal) -> bytes:
    if d.is_zero():
        return _ZERO
    sign, digits, _ = d.as_tuple()
    return _magnitude_key(bool(sign), "".join(map(str, digits)).rstrip("0"), d.adjusted())


def _order_key(value: Value, field: str) -> bytes:
    """Encode a greatest/least value so the Lua scripts compare it bytewise, exactly as Python.

    :raises InvalidUpdateError: the value cannot be ordered.
    """
    if type(value) is int:
        return b"n" + _int_key(value)
    if isinstance(value, datetime.datetime):
        # Exact microseconds since the epoch: aware datetimes compare as instants.
        return b"t" + _int_key((value - _EPOCH) // _MICRO)
    if isinstance(value, datetime.date):
        return b"d" + _int_key(value.toordinal())
    if isinstance(value, str):
        # UTF-8 byte order is code point order (lone surrogates were refused at validation).
        return b"s" + value.encode("utf-8")
    if isinstance(value, bytes):
        return b"b" + value
    if isinstance(value, uuid.UUID):
        return b"u" + value.bytes
    if isinstance(value, (int, float, decimal.Decimal)) and not isinstance(value, bool):
        if isinstance(value, int):
            return b"n" + _int_key(int(value))
        number = decimal.Decimal(value)  # exact, for a float too
        if number.is_finite():
            return b"n" + _decimal_key(number)
    raise InvalidUpdateError(
        f"{field}: {type_name(value)} cannot be ordered", field=field, got=type_name(value)
    )


def _update_args(
    member: str,
    canonical: bytes,
    signal_only: bool,
    n: int,
    first_ms: int,
    columns: Mapping[str, Number],
    extra: Mapping[str, Value],
    greatest: Mapping[str, Value],
    least: Mapping[str, Value],
) -> list[bytes | str | int]:
    """Flatten one update into the ARGV layout ``parse_update`` in lib.lua reads."""
    ints = [(k, v) for k, v in columns.items() if type(v) is int]
    floats = [(k, v) for k, v in columns.items() if type(v) is not int]
    args: list[bytes | str | int] = [
        member,
        canonical,
        "1" if signal_only else "0",
        n,
        first_ms,
        len(ints),
        len(floats),
        len(extra),
        len(greatest),
        len(least),
    ]
    for name, delta in ints:
        args += (name, delta)
    for name, fdelta in floats:
        args += (name, repr(float(fdelta)))
    for name, value in extra.items():
        args += (name, encode_value(value, f"extra[{name!r}]"))
    for what, values in (("greatest", greatest), ("least", least)):
        for name, value in values.items():
            field = f"{what}[{name!r}]"
            args += (name, encode_value(value, field), _order_key(value, field))
    return args


def _raw_update_args(member: str, row: Mapping[bytes, bytes]) -> list[bytes | str | int]:
    """ARGV for a stored row hash, copied as stored (used to replay dead letters)."""
    groups: dict[bytes, list[tuple[bytes, ...]]] = {
        b"c": [],
        b"f": [],
        b"e": [],
        b"g": [],
        b"l": [],
    }
    for field, value in row.items():
        tag, sep, name = field.partition(b":")
        if sep and tag in groups:
            if tag == b"c":
                # A column's sum (int or float text), or the mark of another operation's column.
                if value[:1] != b"~":
                    groups[b"f" if _is_float_text(value) else b"c"].append((name, value))
            elif tag in (b"g", b"l"):
                groups[tag].append((name, value, row[tag.upper() + b":" + name]))
            else:
                groups[tag].append((name, value))
    args: list[bytes | str | int] = [
        member,
        row[b"_k"],
        "1" if row.get(b"_sn", b"") == row.get(b"_n") else "0",
        int(row.get(b"_n", b"1")),
        int(row[b"_f"]),
    ]
    args += [len(groups[t]) for t in (b"c", b"f", b"e", b"g", b"l")]
    for t in (b"c", b"f", b"e", b"g", b"l"):
        for item in groups[t]:
            args += item
    return args


_UNDERSCORE, _SUM, _EXTRA, _MAX, _MIN, _OWNED = (ord(c) for c in "_cegl~")


def _is_float_text(value: bytes) -> bool:
    # lib.lua's float_text always has a '.' or an exponent, and so has Python's repr() of a
    # finite float; an int sum never does ('inf'/'nan' only reach a row through a dead letter
    # of a push that bypassed validation, and must still decode).
    return b"." in value or b"e" in value or b"n" in value


def _decode_row(raw: Sequence[bytes]) -> Update:
    """Build an :class:`Update` from a row hash's HGETALL reply (a flat field/value list).

    Runs once per flushed row, so fields are dispatched on their first byte without an
    intermediate dict.
    """
    canonical = first = None
    count = b"1"
    signals = b""
    columns: dict[str, Number] = {}
    extra: dict[str, Value] = {}
    greatest: dict[str, Value] = {}
    least: dict[str, Value] = {}
    for field, value in zip(raw[::2], raw[1::2], strict=True):
        tag = field[0]
        if tag == _UNDERSCORE:
            if field == b"_k":
                canonical = value
            elif field == b"_n":
                count = value
            elif field == b"_f":
                first = value
            elif field == b"_sn":
                signals = value
        elif field[1:2] == b":":
            name = field[2:].decode("utf-8")
            if tag == _SUM:
                # Inline _is_float_text (once per column of every flushed row); '~' marks a
                # name another operation owns.
                if value[0] == _OWNED:
                    pass
                elif b"." in value or b"e" in value or b"n" in value:
                    columns[name] = float(value)
                else:
                    columns[name] = int(value)
            elif tag == _EXTRA:
                extra[name] = decode_value(value)
            elif tag == _MAX:
                greatest[name] = decode_value(value)
            elif tag == _MIN:
                least[name] = decode_value(value)
    if canonical is None or first is None:
        raise ValueError("corrupt row hash: no _k or no _f field")
    model, filters = decode_row(canonical)
    return _unchecked_update(
        model,
        filters,
        columns,
        extra,
        greatest,
        least,
        signals == count,
        int(count),
        int(first) / 1000.0,
    )


def _cluster_tags(n: int) -> list[str]:
    """Hash tags spreading *n* partitions evenly over the 16384 cluster slots.

    ``redis-cli --cluster create`` gives each master a contiguous slot range, so tags in evenly
    spaced slot ranges land on every master; plain ``p0..pN`` tags could leave one empty.
    """
    tags = []
    for p in range(n):
        low, high = p * 16384 // n, (p + 1) * 16384 // n
        suffix = 0
        while not low <= key_slot(f"p{p}.{suffix}".encode()) < high:
            suffix += 1
        tags.append(f"p{p}.{suffix}")
    return tags


@dataclass(frozen=True)
class _Partition:
    """One pending partition on one node: its key names and its client."""

    node: int
    index: int
    client: AnyRedis
    base: str

    @property
    def pending(self) -> str:
        return f"{self.base}:~pending"

    @property
    def leases(self) -> str:
        return f"{self.base}:~leases"

    @property
    def retry(self) -> str:
        return f"{self.base}:~retry"

    @property
    def dead(self) -> str:
        return f"{self.base}:~dead"

    @property
    def stats(self) -> str:
        return f"{self.base}:~stats"

    def batch(self, batch_id: str) -> str:
        return f"{self.base}:~b:{batch_id}"

    @property
    def label(self) -> str:
        return f"node{self.node}/p{self.index}"


def _check_hosts(hosts: object) -> list[dict[str, Any]]:
    if not isinstance(hosts, Mapping) or not hosts:
        raise ValueError("hosts must be a non-empty mapping {0: {'host': ...}, 1: {...}}")
    ids: list[int] = []
    for key in hosts:
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).isdigit():
            raise ValueError(f"host ids must be ints 0..N-1, got {key!r}")
        ids.append(int(key))
    if sorted(ids) != list(range(len(ids))):
        raise ValueError(f"host ids must be gapless 0..{len(ids) - 1}, got {sorted(ids)}")
    by_id = {int(k): v for k, v in hosts.items()}
    configs = []
    for i in range(len(ids)):
        cfg = by_id[i]
        if not isinstance(cfg, Mapping):
            raise ValueError(f"hosts[{i}] must be a mapping of connection settings")
        unknown = set(cfg) - _HOST_KEYS
        if unknown:
            raise ValueError(f"hosts[{i}] has unknown settings {sorted(unknown)}")
        configs.append(dict(cfg))
    return configs


# Connection settings copied from an injected cluster client to our own (not host/port/db/retry:
# the node is given explicitly, clusters have no db, and retries are what we turn off).
_CLUSTER_SETTINGS = frozenset(
    {
        "client_name",
        "credential_provider",
        "decode_responses",
        "encoding",
        "encoding_errors",
        "max_connections",
        "password",
        "protocol",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "socket_timeout",
        "username",
    }
    | {k for k in redis.cluster.REDIS_ALLOWED_KEYS if k.startswith("ssl_")}
)


def _no_retry() -> Retry:
    """Return a redis-py retry policy that never retries.

    redis-py retries a command after a timeout or a dropped connection. For our scripts that is
    wrong: an ``incr`` whose reply was lost has usually run, and running it again counts it twice
    while reporting success. The caller gets :class:`BackendError` instead and decides.
    """
    return Retry(NoBackoff(), 0)


# redis-py before 6 retries a cluster command `cluster_error_retry_attempts` times whatever
# `retry` says (6 made `retry` govern it and deprecated the argument).
_CLUSTER_NO_RETRY: dict[str, Any] = (
    {"cluster_error_retry_attempts": 0} if int(redis.__version__.split(".")[0]) < 6 else {}
)


def _without_retries(clients: list[AnyRedis]) -> list[AnyRedis]:
    """Return retry-free clients with the injected clients' connection settings.

    The injected clients stay untouched (the host may want retries for its own commands); ours
    use a private pool built from the same connection settings, closed by ``close()``.
    """
    out: list[AnyRedis] = []
    for c in clients:
        if isinstance(c, redis.cluster.RedisCluster):
            # A cluster client cannot be cloned reliably (slot cache, startup nodes): build one
            # from its default node, with the injected client's connection settings.
            node = c.get_default_node() or c.get_nodes()[0]  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            pool = node.redis_connection.connection_pool
            kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _CLUSTER_SETTINGS}
            if issubclass(pool.connection_class, redis.SSLConnection):
                kwargs["ssl"] = True
            out.append(
                redis.cluster.RedisCluster(
                    host=node.host, port=node.port, retry=_no_retry(), **_CLUSTER_NO_RETRY, **kwargs
                )
            )
            continue
        pool = c.connection_pool
        if type(pool) is not redis.ConnectionPool:
            # Sentinel and other managed pools cannot be cloned; use the client as it is.
            log.warning(
                "cannot disable redis-py retries on an injected %s; a retried incr may count "
                "twice after a timeout",
                type(pool).__name__,
            )
            out.append(c)
            continue
        kwargs = {**pool.connection_kwargs, "retry": _no_retry()}
        out.append(
            redis.Redis(
                connection_pool=redis.ConnectionPool(
                    connection_class=pool.connection_class,
                    max_connections=pool.max_connections,
                    **kwargs,
                )
            )
        )
    return out


# Bumped in a forked child: per-thread connections of the parent must not be used there, and
# a local window's thread must be started again.
_fork_generation = 0
_instances: weakref.WeakSet[RedisBuffer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for kept in list(_all_kept):
        kept.reset()
    for buffer in list(_instances):
        buffer._reset_locks_after_fork()


def _push_windows_at_exit() -> None:
    # Last resort for a process that exits without close(): push what its local windows hold.
    for buffer in list(_instances):
        buffer._push_window_at_exit()


class _ExitHooks:
    """Registers the exit push once per process tree: atexit, and multiprocessing's exit."""

    registered = False

    @classmethod
    def register(cls) -> None:
        if cls.registered:
            return
        cls.registered = True
        atexit.register(_push_windows_at_exit)
        # A multiprocessing worker ends with os._exit(): atexit never runs there, its own
        # finalizers do. Registered now, run in every worker forked later.
        import multiprocessing.util  # only processes with a local window need it

        multiprocessing.util.register_after_fork(cls, _ExitHooks._in_worker)
        if multiprocessing.parent_process() is not None:
            # The first window of a process multiprocessing started (a fork or forkserver child
            # exits with os._exit() too): the hook above only serves its future children.
            cls._in_worker(None)

    @staticmethod
    def _in_worker(_: object) -> None:
        import multiprocessing.util

        multiprocessing.util.Finalize(None, _push_windows_at_exit, exitpriority=10)


class _KeptRows:
    """Local-window rows that could not be sent to Redis, kept here as dead letters.

    They belong to the process that buffered them: a forked child starts with none (a copy would
    be replayed twice) and with a fresh lock (the parent's may have been held at fork).
    """

    def __init__(self) -> None:
        self.reset()
        _all_kept.add(self)

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.letters: list[DeadLetter] = []
        #: rows kept since this buffer was created, for ``stats().dead_lettered``
        self.total = 0


_all_kept: weakref.WeakSet[_KeptRows] = weakref.WeakSet()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _fresh_like(lock: object) -> Any:
    return threading.RLock() if isinstance(lock, type(threading.RLock())) else threading.Lock()


def _unlock_client_after_fork(client: AnyRedis) -> None:
    """Give a forked child fresh copies of redis-py's internal locks (called in the child only).

    redis-py resets a pool in a forked child under the pool's own lock (redis-py 8 creates it
    once, in ``__init__``); if another thread of the parent held it at fork() (a command in
    progress), the child blocks forever in its first command. The child runs one thread here,
    so nothing can hold the fresh locks. Attributes are looked up, not assumed: they are
    redis-py internals that vary by version.
    """
    pools: list[Any] = []
    if isinstance(client, redis.cluster.RedisCluster):
        shared = getattr(client, "_lock", None)
        fresh = _fresh_like(shared) if shared is not None else None
        if fresh is not None:
            client._lock = fresh
        manager = getattr(client, "nodes_manager", None)
        if manager is not None:
            held = getattr(manager, "_lock", None)
            if held is not None:
                manager._lock = fresh if held is shared else _fresh_like(held)
            init = getattr(manager, "_initialization_lock", None)
            if init is not None:
                manager._initialization_lock = _fresh_like(init)
            nodes = list(getattr(manager, "nodes_cache", {}).values())
            pools.extend(
                n.redis_connection.connection_pool
                for n in nodes
                if getattr(n, "redis_connection", None) is not None
            )
    else:
        pools.append(client.connection_pool)
    for pool in pools:
        for name in ("_lock", "_fork_lock"):
            lock = getattr(pool, name, None)
            if lock is not None:
                setattr(pool, name, _fresh_like(lock))


def _direct_pool(client: AnyRedis) -> Any:
    """Return the pool whose settings the ``incr`` fast path may copy, or ``None``.

    The fast path sends a pre-packed command on a connection its thread keeps (no pool checkout,
    no command packing). Plain TCP/TLS/Unix connections qualify, over RESP2 or RESP3 alike (the
    connection negotiates the client's protocol, redis-py's default of its version, and reads
    the reply with the matching parser); anything redis-py manages further (cluster routing,
    Sentinel, client-side caching, credential providers that re-authenticate) keeps going
    through ``execute_command``.
    """
    if isinstance(client, redis.cluster.RedisCluster):
        return None
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if (
        type(pool) in (redis.ConnectionPool, redis.BlockingConnectionPool)
        and pool.connection_class
        in (redis.Connection, redis.SSLConnection, redis.UnixDomainSocketConnection)
        and getattr(pool, "cache", None) is None
        and kwargs.get("credential_provider") is None
    ):
        return pool
    return None


class _ThreadConns:
    """One thread's fast-path connections, disconnected as soon as the thread ends.

    Only the thread's ``threading.local`` holds it and it refers to nothing that refers back,
    so CPython frees it by reference counting when it clears the thread's locals at thread
    exit: the sockets close then, not whenever the garbage collector gets to them (a host
    that starts many short-lived threads would otherwise pile up server connections).
    """

    __slots__ = ("conns", "generation")

    def __init__(self, nodes: int) -> None:
        self.conns: list[Any] = [None] * nodes
        self.generation = _fork_generation

    def __del__(self) -> None:
        for conn in self.conns:
            if conn is not None:
                # A half-closed socket must not print a traceback; no module global is used,
                # as they may already be gone when this runs at interpreter shutdown.
                try:  # noqa: SIM105  # contextlib.suppress is a module global
                    conn.disconnect()
                except Exception:  # nothing to report to at thread exit
                    pass


def _is_connected(conn: Any) -> bool:
    """Whether a redis-py connection holds an open socket."""
    try:
        return bool(conn.is_connected)
    except AttributeError:  # redis-py < 8 has no is_connected; its socket attribute says so
        return conn._sock is not None


def _close_client(client: AnyRedis) -> None:
    """Close a client the buffer owns, with every connection of its pools.

    ``close()`` alone leaves the pools' connections open until garbage collection in redis-py
    before 6 (and for a cluster's node clients), which the server counts as clients.
    """
    if isinstance(client, redis.cluster.RedisCluster):
        nodes = client.get_nodes()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        pools = [n.redis_connection.connection_pool for n in nodes if n.redis_connection]
    else:
        pools = [client.connection_pool]
    client.close()
    for pool in pools:
        pool.disconnect()


def _resp_command(client: AnyRedis, args: Sequence[str | bytes | int], count: int) -> bytes:
    """RESP-encode the first arguments of a *count*-argument command, with the client's encoder."""
    encode = client.get_encoder().encode
    out = [b"*%d\r\n" % count]
    for arg in args:
        raw = encode(arg)
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _validated_hosts(hosts: object) -> object:
    _check_hosts(hosts)
    return hosts


def _parse_hosts(text_value: str) -> Any:
    raise ValueError("hosts cannot be given in a URL; pass hosts={0: {...}} as an option")


_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _check_cert_reqs(value: object) -> str:
    """Return ``ssl_cert_reqs`` as the name redis-py accepts in every version."""
    if isinstance(value, ssl.VerifyMode):
        return {mode: name for name, mode in _CERT_REQS.items()}[value]
    if isinstance(value, str) and value.lower() in _CERT_REQS:
        return value.lower()
    raise ValueError("must be none, optional or required (or an ssl.VerifyMode)")


def _check_protocol(value: object) -> int:
    if value in (2, 3) and not isinstance(value, bool):
        return value
    raise ValueError("must be 2 or 3")


def _parse_protocol(text_value: str) -> int:
    return _check_protocol(int(text_value, 10))


def _check_router(value: object) -> object:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, PartitionRouter):
        return value
    raise ValueError("router must be a router name ('crc32', 'ketama') or a PartitionRouter")


class RedisBuffer(_Closeable):
    """Buffer rows in Redis: durable, shared by every process, at-least-once delivery.

    URL forms::

        redis://[[user]:password@]host[:port][/db][?option=value...]
        rediss://...                      (TLS)
        redis+unix:///path/to/redis.sock?db=0   (or redis+unix://localhost/path/to/redis.sock)
        redis+cluster://host:port         (Redis Cluster; any node as seed)
        rediss+cluster://host:port        (Redis Cluster over TLS)

    Besides the options below, a URL (or ``from_url`` keywords) may set the connection's
    ``db``, ``protocol`` (2 or 3) and, for TLS, redis-py's ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile`` and ``ssl_cert_reqs`` (``none`` | ``optional`` | ``required``).

    Example configuration::

        buf = updatebuffer.from_url("redis://127.0.0.1:6379/0?delay=5", flush=write_rows)
        buf = updatebuffer.from_config(
            {"backend": "redis",
             "options": {"hosts": {0: {"host": "10.0.0.1"}, 1: {"host": "10.0.0.2"}},
                         "delay": 5}},
            flush=write_rows,
        )
        buf = RedisBuffer(flush=write_rows, client=redis.Redis(), delay=5)

    :param flush: the host's flush callback.
    :param client: a ``redis.Redis``, a ``redis.cluster.RedisCluster``, or a sequence of
        ``redis.Redis`` (independent nodes, sharded by *router*). Injected clients are used
        for their connection settings only: the buffer talks through its own retry-free pool
        (a retried script could count an update twice) and never closes them. Clients must not
        use ``decode_responses=True``.
    :param hosts: Sentry-style ``{0: {"host": ..., "port": ...}, 1: {...}}`` instead of *client*.
    :param router: partition router for several nodes: ``"crc32"`` (default), ``"ketama"`` or a
        :class:`PartitionRouter` instance.
    :param delay: seconds from a row's first update (server clock) until it is due (default 5).
    :param batch_size: rows per flush callback call (default 500).
    :param lease: seconds a claimed batch is held before it is redelivered (default 30); must
        exceed the flush callback's worst-case duration.
    :param max_attempts: deliveries of a failing batch before it is split (default 10).
    :param partitions: pending partitions per node (per cluster), default 16. Changing it while
        rows are buffered strands them: drain first.
    :param key_prefix: prefix of every key (default ``ub``).
    :param socket_timeout: seconds before a Redis call fails with :class:`BackendError`.
    :param local_window: seconds of process-local pre-aggregation (default 0 = off). The window
        is pushed by a thread of its own (one per process, also in a forked child), by
        :meth:`drain`, by :meth:`close`, and at a normal interpreter or multiprocessing-worker
        exit without close; updates in it are lost if the process is killed before a push; see
        the README.
    :param retry_backoff: seconds before the first redelivery of a failed batch (doubles).
    :param retry_backoff_max: cap of the redelivery backoff.
    :param drain_on_close: whether :meth:`close` drains Redis too (default false: Redis keeps the
        rows for the workers).
    """

    #: Typed options accepted in the URL query or as keywords.
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "delay": duration(5.0),
        "batch_size": count(500),
        "lease": duration(30.0, minimum=0.001),
        "max_attempts": count(10),
        "partitions": count(16),
        "key_prefix": text("ub"),
        "socket_timeout": duration(5.0, minimum=0.001),
        "local_window": duration(0.0),
        "retry_backoff": duration(1.0),
        "retry_backoff_max": duration(300.0),
        "drain_on_close": boolean(False),
        "router": Option(_check_router, _check_router, "crc32", "crc32 | ketama | router"),
        "hosts": Option(_parse_hosts, _validated_hosts, None, "{0: {...}, 1: {...}}"),
        "db": count(None, minimum=0),
        # TLS (rediss://), redis-py's names: a private CA, a client certificate, verification.
        "ssl_ca_certs": text(None),
        "ssl_certfile": text(None),
        "ssl_keyfile": text(None),
        "ssl_cert_reqs": Option(
            _check_cert_reqs, _check_cert_reqs, None, "none | optional | required"
        ),
        # RESP version; by default redis-py's (RESP2 before redis-py 8, RESP3 from 8).
        "protocol": Option(_parse_protocol, _check_protocol, None, "2 | 3"),
    }

    def __init__(
        self,
        *,
        flush: FlushCallback,
        client: AnyRedis | Sequence[AnyRedis] | None = None,
        hosts: Mapping[Any, Mapping[str, Any]] | None = None,
        router: str | PartitionRouter = "crc32",
        delay: float = 5.0,
        batch_size: int = 500,
        lease: float = 30.0,
        max_attempts: int = 10,
        partitions: int = 16,
        key_prefix: str = "ub",
        socket_timeout: float = 5.0,
        local_window: float = 0.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 300.0,
        drain_on_close: bool = False,
        _url: str | None = None,
        _owned: bool = False,
    ) -> None:
        if not callable(flush):
            raise ConfigurationError(f"flush must be callable, got {type(flush).__qualname__}")
        opts = parse_options(
            "redis",
            self.OPTIONS,
            "",
            {
                "delay": delay,
                "batch_size": batch_size,
                "lease": lease,
                "max_attempts": max_attempts,
                "partitions": partitions,
                "key_prefix": key_prefix,
                "socket_timeout": socket_timeout,
                "local_window": local_window,
                "retry_backoff": retry_backoff,
                "retry_backoff_max": retry_backoff_max,
                "drain_on_close": drain_on_close,
                "router": router,
            },
        )
        if not _PREFIX.match(opts["key_prefix"]):
            raise ConfigurationError(
                "key_prefix may hold only letters, digits, '_', '.', '-'", option="key_prefix"
            )
        self._flush = flush
        self.delay: float = opts["delay"]
        self.batch_size: int = opts["batch_size"]
        self.lease: float = opts["lease"]
        self.max_attempts: int = opts["max_attempts"]
        self.partitions: int = opts["partitions"]
        self.key_prefix: str = opts["key_prefix"]
        self.local_window: float = opts["local_window"]
        self.retry_backoff: float = opts["retry_backoff"]
        self.retry_backoff_max: float = opts["retry_backoff_max"]
        self.drain_on_close: bool = opts["drain_on_close"]
        self._url = mask_url(_url) if _url else None
        self._closed = False
        # Set once close() finished without losing anything; a failed close() can be repeated.
        self._close_done = False
        self._close_lock = threading.Lock()

        if client is not None and hosts is not None:
            raise ConfigurationError("give either client or hosts, not both", option="hosts")
        owned = _owned
        if hosts is not None:
            try:
                configs = _check_hosts(hosts)
            except ValueError as exc:
                raise ConfigurationError(f"invalid hosts: {exc}", option="hosts") from None
            timeout = opts["socket_timeout"]
            # No automatic retries (see _no_retry).
            clients: list[AnyRedis] = [
                redis.Redis(
                    **{
                        "socket_timeout": timeout,
                        "socket_connect_timeout": timeout,
                        "retry": _no_retry(),
                        **cfg,
                    }
                )
                for cfg in configs
            ]
            owned = True
        elif client is None:
            raise ConfigurationError("RedisBuffer needs client=, hosts= or a URL (from_url)")
        elif isinstance(client, (redis.Redis, redis.cluster.RedisCluster)):
            clients = [client]
        elif (
            isinstance(client, Sequence)
            and client
            and all(isinstance(c, redis.Redis) for c in client)
        ):
            clients = list(client)
        else:
            raise ConfigurationError(
                "client must be a redis.Redis, a redis.cluster.RedisCluster or a non-empty "
                f"sequence of redis.Redis, got {type(client).__qualname__}"
            )
        for c in clients:
            if c.get_encoder().decode_responses:
                raise ConfigurationError(
                    "the redis client must not use decode_responses=True: rows hold bytes"
                )
        if client is not None and not _owned:
            clients, owned = _without_retries(clients), True
        self._clients = clients
        self._owned = owned
        self.cluster = isinstance(clients[0], redis.cluster.RedisCluster)
        self._router: PartitionRouter | None = (
            make_router(opts["router"], len(clients)) if len(clients) > 1 else None
        )
        tags = (
            _cluster_tags(self.partitions)
            if self.cluster
            else [f"p{p}" for p in range(self.partitions)]
        )
        self._parts: list[list[_Partition]] = [
            [
                _Partition(node, p, c, f"{self.key_prefix}:{KEY_VERSION}:{{{tags[p]}}}")
                for p in range(self.partitions)
            ]
            for node, c in enumerate(clients)
        ]
        self._scripts: list[dict[str, Script]] = [
            {name: c.register_script(src) for name, src in _SOURCES.items()} for c in clients
        ]
        self._rotation = 0
        # (model, column, filter name, type, value) -> see _fast_ident
        self._idents: dict[tuple[Any, ...], tuple[_Partition, tuple[Any, ...], bytes]] = {}
        self._direct_pools = [_direct_pool(c) for c in clients]
        self._local = threading.local()
        # Every per-thread connection, for close(); a finished thread's ones close at its exit.
        self._thread_conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread_conns_lock = threading.Lock()
        self._window: MemoryBuffer | None = None
        self._window_flusher: Flusher | None = None
        # Held while the window is flushed (pushed to Redis), by its thread or by drain().
        self._window_lock = threading.Lock()
        self._window_generation = _fork_generation
        # Window rows that could not be sent to Redis at all, kept as dead letters here.
        self._kept = _KeptRows()
        if self.local_window > 0:
            self._start_window()
        _instances.add(self)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, flush: FlushCallback, **options: Any) -> Self:
        """Build a Redis buffer from a URL (see the class docstring) and keyword options.

        :raises ConfigurationError: an unsupported scheme, a malformed host, port or database
            number, or an invalid option.
        """
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  # raises on a malformed port: a mistake, not an outage
        except ValueError as exc:
            raise ConfigurationError(f"malformed redis URL {mask_url(url)}: {exc}") from None
        scheme = parts.scheme.lower()
        schemes = ("redis", "rediss", "redis+unix", "redis+cluster", "rediss+cluster")
        if scheme not in schemes:
            raise ConfigurationError(
                f"unsupported redis URL scheme {scheme!r} in {mask_url(url)}; use one of "
                + ", ".join(f"{s}://" for s in schemes)
            )
        opts = parse_options(
            "redis",
            cls.OPTIONS,
            url,
            options,
            passthrough={"client": None},
        )
        db = opts.pop("db")
        hosts = opts.pop("hosts")
        path_db = parts.path.strip("/")
        if "+unix" not in scheme and path_db and not path_db.isdigit():
            raise ConfigurationError(
                f"malformed redis URL {mask_url(url)}: the path must be a database number",
                option="db",
            )
        if "+cluster" in scheme and (path_db not in ("", "0") or db not in (None, 0)):
            raise ConfigurationError(
                f"{mask_url(url)}: Redis Cluster has only database 0", option="db"
            )
        client = options.get("client")
        if (
            sum(x is not None for x in (client, hosts))
            + bool(parts.netloc or parts.path.strip("/"))
            > 1
        ):
            raise ConfigurationError(
                f"{mask_url(url)}: give the server once (URL host, hosts= or client=)"
            )
        timeout = opts["socket_timeout"]
        conn: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": _no_retry(),
        }
        # Connection settings of the URL's own server (a client or hosts= entry has its own).
        server = {k: v for k in ("protocol", *_TLS_OPTIONS) if (v := opts.pop(k)) is not None}
        if server and (client is not None or hosts is not None):
            raise ConfigurationError(
                f"{', '.join(server)} apply to the URL's server only: set them on the injected "
                "client or in each hosts= entry",
                option=next(iter(server)),
            )
        tls = [k for k in server if k in _TLS_OPTIONS]
        if tls and not scheme.startswith("rediss"):
            raise ConfigurationError(
                f"{', '.join(tls)} need a rediss:// or rediss+cluster:// URL (TLS), "
                f"not {mask_url(url)}",
                option=tls[0],
            )
        conn.update(server)
        # Not urlunsplit: it drops the "//" of an empty host (unix:/path), which redis-py
        # refuses; redis+unix:///path.sock and redis+unix://localhost/path.sock both mean a path.
        plain_scheme = scheme.replace("+cluster", "").replace("redis+unix", "unix")
        plain = f"{plain_scheme}://{parts.netloc}{parts.path}"
        owned = False
        if client is None and hosts is None:
            if not parts.netloc and not parts.path.strip("/"):
                raise ConfigurationError(
                    f"{mask_url(url)} names no server; use redis://host:port/db, or pass hosts="
                )
            if db is not None:
                conn["db"] = db
            try:
                if "+cluster" in scheme:
                    client = redis.cluster.RedisCluster.from_url(plain, **conn, **_CLUSTER_NO_RETRY)
                else:
                    client = redis.Redis.from_url(plain, **conn)
            except (ValueError, *_REDIS_ERRORS) as exc:
                raise BackendError(f"cannot connect to {mask_url(url)}: {exc}") from exc
            owned = True
        return cls(flush=flush, client=client, hosts=hosts, _url=url, _owned=owned, **opts)

    def __repr__(self) -> str:
        where = self._url or f"{len(self._clients)} client(s)"
        return (
            f"RedisBuffer({where}, delay={self.delay}, batch_size={self.batch_size}, "
            f"partitions={self.partitions}, cluster={self.cluster})"
        )

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except _REDIS_ERRORS as exc:
            where = self._url or "redis"
            raise BackendError(f"redis error while {doing} ({where}): {exc}") from exc

    def _script(self, part: _Partition, name: str) -> Script:
        return self._scripts[part.node][name]

    # -- writing -----------------------------------------------------------------------------

    def _locate(self, model: str, canonical: bytes) -> tuple[_Partition, str]:
        digest = row_digest(canonical)
        member = f"{readable_model(model)}:{digest}"
        node = self._router.get_node(member) if self._router is not None else 0
        return self._parts[node][int(digest[:8], 16) % self.partitions], member

    def _fast_ident(
        self, model: str, filters: Mapping[str, Value], column: str
    ) -> tuple[_Partition, tuple[Any, ...], bytes]:
        """Return what the ``incr`` fast path needs for one (row, column).

        That is the row's partition, the EVALSHA arguments up to the delta, and the same packed
        as RESP (``b""`` when the node has no direct pool, see :func:`_direct_pool`).
        """
        canonical = encode_row(model, filters)  # validates model, name and value
        check_name(column, "columns key")  # a str Redis cannot take (a lone surrogate)
        if column in filters:
            raise conflicting_operations(column, "filters", "columns")
        part, member = self._locate(model, canonical)
        sha = self._scripts[part.node]["incr"].sha
        head = (
            "EVALSHA",
            sha,
            2,
            part.pending,
            part.stats,
            part.base,
            "!",
            member,
            canonical,
            column,
        )
        direct = self._direct_pools[part.node] is not None
        return part, head, _resp_command(part.client, head, len(head) + 1) if direct else b""

    def _thread_conn(self, node: int) -> Any:
        """Return the calling thread's own ready connection to *node*, from its pool settings.

        Never shared between threads, so a command and its reply need no pool checkout; redis-py
        disconnects it on any error or interruption mid-command, so no stale reply is ever read.
        """
        held = self._local.__dict__.get("held")
        if held is None or held.generation != _fork_generation:
            held = self._local.held = _ThreadConns(len(self._clients))
        conns = held.conns
        conn = conns[node]
        if conn is None:
            pool = self._direct_pools[node]
            conn = conns[node] = pool.connection_class(**pool.connection_kwargs)
            with self._thread_conns_lock:
                self._thread_conns.add(conn)
        elif _is_connected(conn):
            # As the pool does on checkout: a connection the server closed while it was idle
            # (its `timeout`, CLIENT KILL, a restart) reconnects now instead of failing the
            # next incr.
            try:
                stale = conn.can_read()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
        return conn

    def incr(
        self,
        model: str,
        columns: Mapping[str, Number] | None = None,
        filters: Mapping[str, Value] | None = None,
        extra: Mapping[str, Value] | None = None,
        *,
        greatest: Mapping[str, Value] | None = None,
        least: Mapping[str, Value] | None = None,
        signal_only: bool = False,
    ) -> None:
        """Buffer one update of the row ``(model, filters)`` in one atomic script call.

        :raises InvalidUpdateError: invalid name, type or value, or a sum leaving signed 64-bit;
            nothing is stored.
        :raises BackendError: Redis is unreachable or failed; the update may or may not have
            been applied if the connection dropped after sending it.
        :raises UpdateBufferError: the buffer is closed.
        """
        if self._closed:
            raise UpdateBufferError("incr() on a closed buffer")
        # Fast path for the hot shape (one int delta, one filter of a common type, nothing
        # else), like MemoryBuffer's: the row's partition, member and canonical bytes are cached
        # per identity, and the script runs by SHA with a short ARGV incr.lua recognises.
        if (
            self._window is None
            and extra is None
            and greatest is None
            and least is None
            and signal_only is False
            and type(columns) is dict
            and type(filters) is dict
            and len(columns) == 1
            and len(filters) == 1
        ):
            [(column, delta)] = columns.items()
            [(name, value)] = filters.items()
            vtype = type(value)
            if (
                type(delta) is int
                and type(column) is str
                and column
                and vtype in _FAST_TAGS
                and INT64_MIN <= delta <= INT64_MAX
            ):
                ident = (model, column, name, vtype, value)
                where = self._idents.get(ident)
                if where is None:
                    where = self._fast_ident(model, filters, column)
                    if len(self._idents) >= 65_536:
                        self._idents.clear()
                    self._idents[ident] = where
                part, head, packed = where
                reply = None
                # NoScriptError: not loaded (server restarted); the general path below loads it.
                with self._errors("buffering an update"), suppress(redis.exceptions.NoScriptError):
                    if packed:
                        conn = self._thread_conn(part.node)
                        digits = b"%d" % delta
                        conn.send_packed_command(
                            (b"%s$%d\r\n%s\r\n" % (packed, len(digits), digits),)
                        )
                        reply = conn.read_response()
                    else:
                        reply = part.client.execute_command(*head, delta)
                # A refusal changed nothing: an int64 overflow, or a column that holds a float sum
                # or belongs to another operation; the general path below tells which (or adds
                # the delta to the float sum).
                if reply is not None and not reply:
                    return
        if self._window is not None:
            if self._window_generation != _fork_generation:
                self._restart_window_after_fork()
            # The window validates like every backend; Redis orders every value it accepts.
            self._window.incr(
                model,
                columns,
                filters,
                extra,
                greatest=greatest,
                least=least,
                signal_only=signal_only,
            )
            return
        if not filters:
            require_filters(filters)
        canonical = encode_row(model, filters)  # type: ignore[arg-type]  # None refused above
        ops = check_operations(columns, extra, greatest, least, signal_only, filters)
        args = _update_args(
            "", canonical, ops.signal_only, 1, 0, ops.columns, ops.extra, ops.greatest, ops.least
        )
        part, member = self._locate(model, canonical)
        args[0] = member
        with self._errors("buffering an update"):
            failed = self._script(part, "incr")(
                keys=[part.pending, part.stats], args=[part.base, "", 1, *args]
            )
        if failed:
            raise self._refusal(failed, ops, part, member)

    def _refusal(
        self, reply: Sequence[Any], ops: Operations, part: _Partition, member: str
    ) -> InvalidUpdateError:
        """Return the :class:`InvalidUpdateError` for an incr script's refusal of *ops*."""
        _, raw_code, raw_field = reply
        code, field = raw_code.decode(), raw_field.decode()
        kind, _, name = field.partition(":")
        if code != "mixed" or kind not in ("G", "L"):
            return _rejection(code, field)
        # Name both types, as the other backends do: the given value's, and the buffered one's
        # family from its order key (one more round trip, on this error path only).
        new = (ops.greatest if kind == "G" else ops.least)[name]
        with suppress(*_REDIS_ERRORS):
            held = part.client.hget(f"{part.base}:{member}", field)
            if held:
                family = _FAMILIES.get(held[:1], "another type")
                what = f"{_OPERATIONS[kind]}[{name!r}]"
                return InvalidUpdateError(
                    f"{what}: cannot compare {type_name(new)} with the buffered {family}; a "
                    "column must keep one type",
                    field=what,
                    expected=family,
                    got=type_name(new),
                )
        return _rejection(code, field)

    def _push(self, batch: Batch) -> None:
        """Flush callback of the local window: merge its rows into Redis, one call per partition.

        Each call carries a push id derived from the batch id, so a push retried after a lost
        reply is not applied twice. Rows Redis refuses (a sum overflowing 64-bit) are kept as
        dead letters in Redis with the reason, never dropped. A row that cannot be sent at all
        (its names or values cannot be encoded) is kept as a dead letter in this process; it
        never blocks the other rows. A partition whose call fails does not stop the others:
        the push raises after trying them all, and the window retries it (partitions already
        pushed are recognised by their push ids).

        :raises BackendError: Redis failed for at least one partition.
        """
        unsendable = self._send(batch)
        if unsendable:
            now = time.time()
            kept = self._kept
            with kept.lock:
                for update, exc in unsendable:
                    log.error(
                        "local-window row %s %r of push %s cannot be sent to redis (%r); kept "
                        "as a dead letter in this process",
                        update.model,
                        update.filters,
                        batch.id,
                        exc,
                    )
                    kept.letters.append(DeadLetter(update, f"{batch.id}.local", 0, repr(exc), now))
                    kept.total += 1

    def _send(self, batch: Batch) -> list[tuple[Update, Exception]]:
        """Merge *batch* into Redis (see :meth:`_push`); return the rows that cannot be sent.

        :raises BackendError: Redis failed for at least one partition.
        """
        groups: dict[tuple[int, int], list[list[bytes | str | int]]] = {}
        unsendable: list[tuple[Update, Exception]] = []
        for update in batch:
            try:
                canonical = encode_row(update.model, update.filters)
                part, member = self._locate(update.model, canonical)
                args = _update_args(
                    member,
                    canonical,
                    update.signal_only,
                    update.count,
                    0,
                    update.columns,
                    update.extra,
                    update.greatest,
                    update.least,
                )
                # redis-py encodes str arguments (strict UTF-8) only while sending, where one
                # bad row would fail its whole partition's call: encode each row's here.
                args = [a.encode("utf-8") if isinstance(a, str) else a for a in args]
            except Exception as exc:  # any row that cannot be sent is kept, never fatal
                unsendable.append((update, exc))
                continue
            groups.setdefault((part.node, part.index), []).append(args)
        errors: list[BackendError] = []
        for (node, index), rows in groups.items():
            part = self._parts[node][index]
            flat: list[bytes | str | int] = [part.base, f"{batch.id}.{node}.{index}", len(rows)]
            for args in rows:
                flat += args
            try:
                with self._errors("pushing the local window"):
                    failed = self._script(part, "incr")(keys=[part.pending, part.stats], args=flat)
            except BackendError as exc:
                errors.append(exc)
                continue
            if failed and failed != b"dup":
                for k in range(0, len(failed), 3):
                    log.error(
                        "local-window row %d of push %s refused by redis (%s on %s); kept as a "
                        "dead letter",
                        failed[k],
                        batch.id,
                        failed[k + 1].decode(),
                        failed[k + 2].decode(),
                    )
        if errors:
            # Retried as a whole; the rows that cannot be sent are kept once, by the retry
            # that succeeds.
            raise errors[0]
        return unsendable

    def _start_window(self) -> None:
        from updatebuffer.backends.memory import MemoryBuffer
        from updatebuffer.flusher import Flusher

        self._window = MemoryBuffer(
            flush=self._push,
            delay=self.local_window,
            batch_size=self.batch_size,
            max_rows=max(10 * self.batch_size, 10_000),
            # A Redis outage must not dead-letter the window in process memory: keep retrying.
            max_attempts=1_000_000,
            retry_backoff=min(self.local_window, 1.0),
            retry_backoff_max=5.0,
        )
        self._window_flusher = Flusher(
            _LockedWindow(self._window, self._window_lock),
            interval=self.local_window,
            name="updatebuffer-local-window",
        )
        # In a forked child the thread starts with the child's first incr (see
        # _restart_window_after_fork), once every after-fork reset has run.
        self._window_flusher.restart_after_fork = False
        self._window_flusher.start()
        _ExitHooks.register()

    def _reset_locks_after_fork(self) -> None:
        # A parent thread may have held any of these at fork() (a push in progress holds the
        # window lock for its round trip): the child must not inherit them locked. The child's
        # window is empty (MemoryBuffer's own reset): the parent pushes what it held.
        self._close_lock = threading.Lock()
        self._thread_conns_lock = threading.Lock()
        self._thread_conns = weakref.WeakSet()
        self._window_lock = threading.Lock()
        for client in self._clients:
            _unlock_client_after_fork(client)
        if self._window_flusher is not None:
            self._window_flusher.buffer = _LockedWindow(
                cast("MemoryBuffer", self._window), self._window_lock
            )

    def _restart_window_after_fork(self) -> None:
        flusher = cast("Flusher", self._window_flusher)
        with self._close_lock:
            if self._window_generation == _fork_generation:
                return  # another thread did
            self._window_generation = _fork_generation
            if not self._closed:
                flusher._after_fork(restart=False)
                flusher.start()

    def _push_window(self) -> None:
        """Push every row of the local window to Redis now, ignoring delay and backoff.

        :raises BackendError: some rows could not be pushed; they stay in the window.
        """
        window = cast("MemoryBuffer", self._window)
        with self._window_lock:
            window.drain()
            left = window.stats()
        kept = left.pending_rows + left.in_flight_rows + left.dead_letters
        if kept:
            raise BackendError(
                f"{kept} local-window rows could not be pushed to Redis{self._where()}; they "
                "are kept in this process: call close() or drain() again once Redis is back"
            )

    def _where(self) -> str:
        return f" at {self._url}" if self._url else ""

    def _push_window_at_exit(self) -> None:
        # Also after a close() that failed: this is the rows' last chance.
        if self._window is None or self._close_done:
            return
        try:
            self._push_window()
        except BackendError as exc:
            log.error("at exit, without close(): %s; they are lost now", exc)

    # -- flushing ----------------------------------------------------------------------------

    def process_pending(self, *, max_batches: int | None = None) -> int:
        """Flush due rows and due redeliveries on every node and partition, fairly.

        Rows first buffered after this call started wait for the next call.

        :param max_batches: deliver at most this many batches (a worker that must stop soon
            calls it with 1); ``None`` delivers everything due.
        :return: rows whose flush callback returned.
        :raises BackendError: Redis failed; claimed batches are redelivered after their lease.
        """
        return self._run(drain=False, max_batches=max_batches)

    def drain(self) -> int:
        """Flush everything now: the local window, every pending row, every failed batch once.

        Delay and backoff are ignored.

        :return: rows whose flush callback returned.
        """
        if self._window is not None:
            # Under the lock: a push the window's thread has in hand finishes first, so its
            # rows are in Redis before the claims below (not flushed a cycle later).
            with self._window_lock:
                self._window.drain()
        return self._run(drain=True)

    def _server_ms(self, client: AnyRedis) -> int:
        if self.cluster:
            seconds, micros = client.time(target_nodes=redis.cluster.RedisCluster.RANDOM)
        else:
            seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _run(self, *, drain: bool, max_batches: int | None = None) -> int:
        delay_ms = 0 if drain else int(self.delay * 1000)
        with self._errors("reading the server clock"):
            cutoffs = [self._server_ms(c) - delay_ms for c in self._clients]
        order = [part for parts in self._parts for part in parts]
        self._rotation = (self._rotation + 1) % len(order)
        order = order[self._rotation :] + order[: self._rotation]
        failed: set[str] = set()
        flushed = batches = 0
        busy = True
        while busy:
            busy = False
            for part in order:
                if max_batches is not None and batches >= max_batches:
                    return flushed
                # One batch per partition per pass: a hot partition cannot starve the others.
                got = self._redeliver(part, drain, failed)
                if got is None:
                    got = self._claim(part, cutoffs[part.node])
                if got is not None:
                    busy = True
                    batches += 1
                    flushed += self._deliver(part, *got, failed)
        return flushed

    def _redeliver(
        self, part: _Partition, drain: bool, failed: set[str]
    ) -> tuple[str, int, list[Sequence[bytes]]] | None:
        script = self._script(part, "reclaim")
        while True:
            with self._errors("re-claiming a batch"):
                reply = script(
                    keys=[part.leases, part.retry, part.dead, part.stats],
                    args=[
                        part.base,
                        int(self.lease * 1000),
                        self.max_attempts,
                        "1" if drain else "0",
                        "\n".join(failed),
                    ],
                )
            if reply is None:
                return None
            kind = reply[0]
            if kind == b"batch":
                if int(reply[2]) > self.max_attempts:
                    log.error(
                        "batch %s is delivered for the %d. time: its lease expired before, so it "
                        "is not split until a delivery raises; is a worker crashing on it?",
                        reply[1].decode(),
                        int(reply[2]),
                    )
                return reply[1].decode(), int(reply[2]), reply[3]
            if kind == b"dead":
                log.error(
                    "batch %s dead-lettered after %d attempts", reply[1].decode(), self.max_attempts
                )
            # 'split' and 'gone': look again right away.

    def _claim(
        self, part: _Partition, cutoff_ms: int
    ) -> tuple[str, int, list[Sequence[bytes]]] | None:
        batch_id = uuid.uuid4().hex
        with self._errors("claiming rows"):
            reply = self._script(part, "claim")(
                keys=[part.pending, part.leases, part.batch(batch_id)],
                args=[part.base, batch_id, self.batch_size, cutoff_ms, int(self.lease * 1000)],
            )
        if reply is None:
            return None
        return reply[0].decode(), int(reply[1]), reply[2]

    def _deliver(
        self,
        part: _Partition,
        batch_id: str,
        attempt: int,
        rows: list[Sequence[bytes]],
        failed: set[str],
    ) -> int:
        batch = Batch([_decode_row(r) for r in rows], id=batch_id, attempt=attempt)
        try:
            self._flush(batch)
        except BaseException as exc:
            log.warning(
                "flush callback failed for batch %s (attempt %d, %d rows); it will be redelivered",
                batch.id,
                batch.attempt,
                len(batch),
                exc_info=True,
            )
            failed.add(batch_id)
            backoff = backoff_delay(attempt + 1, self.retry_backoff, self.retry_backoff_max)
            with self._errors("releasing a failed batch"):
                self._script(part, "fail")(
                    keys=[part.batch(batch_id), part.leases, part.retry, part.stats],
                    args=[batch_id, attempt, int(backoff * 1000), repr(exc)[:2000]],
                )
            if not isinstance(exc, Exception):
                raise
            return 0
        with self._errors("acknowledging a batch"):
            self._script(part, "ack")(
                keys=[part.batch(batch_id), part.leases, part.retry, part.stats],
                args=[part.base, batch_id],
            )
        return len(batch)

    # -- reading -----------------------------------------------------------------------------

    def get(self, model: str, filters: Mapping[str, Value]) -> Update | None:
        """Return the not yet flushed update of a row (in-flight, pending and window parts merged).

        :raises InvalidUpdateError: the model or filters are invalid.
        :raises BackendError: Redis failed.
        """
        canonical = encode_row(model, filters)
        part, member = self._locate(model, canonical)
        window = self._window
        # Under the window lock: a push in hand is either all in Redis or all in the window,
        # never counted in both.
        with self._window_lock if window is not None else nullcontext():
            with self._errors("reading a row"):
                in_flight, pending = self._script(part, "get")(
                    keys=[f"{part.base}:~f:{member}", f"{part.base}:{member}"]
                )
            parts = [_decode_row(raw) for raw in (in_flight, pending) if raw]
            # The window's part is the newest: it reaches Redis only at its next push.
            local = None if window is None else window.get(model, filters)
        if local is not None:
            parts.append(local)
        if not parts:
            return None
        merged = parts[0]
        for later in parts[1:]:
            merged = merge_updates(merged, later, strict=False)
        return merged

    def stats(self) -> BufferStats:
        """Return pending, in-flight and dead counts per partition and lifetime totals.

        Totals are shared by every process using these Redis keys. With ``local_window``,
        ``pending_rows`` and ``oldest_pending_age`` also count this process's rows not yet pushed.

        :raises BackendError: Redis failed.
        """
        totals = {b"accepted": 0, b"flushed": 0, b"failures": 0, b"retries": 0, b"dead": 0}
        per_partition: dict[str, int] = {}
        pending = in_flight = in_flight_rows = dead = 0
        oldest: float | None = None
        with self._errors("reading stats"):
            for node, parts in enumerate(self._parts):
                now_ms = self._server_ms(self._clients[node])
                for part in parts:
                    c = part.client
                    n = c.zcard(part.pending)
                    per_partition[part.label] = n
                    pending += n
                    head = c.zrange(part.pending, 0, 0, withscores=True)
                    if head:
                        age = (now_ms - head[0][1]) / 1000.0
                        oldest = age if oldest is None else max(oldest, age)
                    ids = c.zrange(part.leases, 0, -1) + c.zrange(part.retry, 0, -1)
                    in_flight += len(ids)
                    for batch_id in ids:
                        in_flight_rows += int(c.hget(part.batch(batch_id.decode()), "n") or 0)
                    dead += c.zcard(part.dead)
                    for field, value in c.hgetall(part.stats).items():
                        if field in totals:
                            totals[field] += int(value)
        kept = self._kept
        with kept.lock:
            dead += len(kept.letters)
            totals[b"dead"] += kept.total
        if self._window is not None:
            # Rows still in this process's window are buffered too: not pushed, not claimed.
            held = self._window.stats()
            pending += held.pending_rows + held.in_flight_rows
            if held.oldest_pending_age is not None:
                oldest = max(oldest or 0.0, held.oldest_pending_age)
        return BufferStats(
            pending_rows=pending,
            oldest_pending_age=oldest,
            in_flight_batches=in_flight,
            in_flight_rows=in_flight_rows,
            dead_letters=dead,
            updates_accepted=totals[b"accepted"],
            rows_flushed=totals[b"flushed"],
            callback_failures=totals[b"failures"],
            retries=totals[b"retries"],
            dead_lettered=totals[b"dead"],
            pending_by_partition=per_partition,
        )

    # -- dead letters ------------------------------------------------------------------------

    def _dead_rows(
        self,
    ) -> Iterator[tuple[_Partition, str, dict[bytes, bytes], dict[bytes, bytes]]]:
        for parts in self._parts:
            for part in parts:
                c = part.client
                for raw_id in c.zrange(part.dead, 0, -1):
                    batch_id = raw_id.decode()
                    bkey = part.batch(batch_id)
                    meta = c.hgetall(bkey)
                    row = c.hgetall(f"{bkey}:1")
                    if meta and row:
                        yield part, batch_id, meta, row

    def dead_letters(self) -> list[DeadLetter]:
        """Return the rows that failed alone ``max_attempts`` times, on every partition.

        With ``local_window``, also the rows Redis refused at push time, and those that could not
        be sent to Redis at all (kept in this process).

        :raises BackendError: Redis failed.
        """
        letters = []
        with self._errors("listing dead letters"):
            for _, batch_id, meta, row in self._dead_rows():
                letters.append(
                    DeadLetter(
                        update=_decode_row(_flat(row)),
                        batch_id=batch_id,
                        attempts=int(meta.get(b"attempt", b"0")),
                        error=meta.get(b"error", b"").decode("utf-8", "replace"),
                        failed_at=int(meta.get(b"failed_at", meta.get(b"dead_at", b"0"))) / 1000,
                    )
                )
        kept = self._kept
        with kept.lock:
            letters += kept.letters
        letters.sort(key=lambda letter: letter.failed_at)
        return letters

    def replay_dead_letters(self) -> int:
        """Merge every dead letter back into the pending rows (before newer data of the same row).

        :return: how many rows were replayed.
        :raises BackendError: Redis failed.
        """
        replayed = 0
        with self._errors("replaying dead letters"):
            # Newest first: replay.lua merges a letter *before* the row's pending data, so two
            # letters of one row replayed oldest first would let the older `extra` win. One row's
            # letters share a partition, where _dead_rows lists them in dead-lettering order.
            for part, batch_id, meta, row in reversed(list(self._dead_rows())):
                member = meta[b"members"].decode()
                reply = self._script(part, "replay")(
                    keys=[part.pending, part.dead, part.stats],
                    args=[part.base, batch_id, *_raw_update_args(member, row)],
                )
                if reply == 1:
                    replayed += 1
                elif isinstance(reply, list):
                    log.error(
                        "dead letter %s cannot be replayed: %s on %s",
                        batch_id,
                        reply[0].decode(),
                        reply[1].decode(),
                    )
        kept = self._kept
        with kept.lock:
            local = list(kept.letters)
        if local:
            # Pushed again as they are; a row that still cannot be sent stays where it is.
            still = self._send(Batch([letter.update for letter in local], id=uuid.uuid4().hex))
            unsent = {id(update) for update, _ in still}
            sent = {id(letter) for letter in local if id(letter.update) not in unsent}
            with kept.lock:
                kept.letters = [x for x in kept.letters if id(x) not in sent]
            replayed += len(sent)
        return replayed

    def purge_dead_letters(self) -> int:
        """Delete every dead letter; return how many were deleted.

        :raises BackendError: Redis failed.
        """
        kept = self._kept
        with kept.lock:
            purged, kept.letters = len(kept.letters), []
        with self._errors("purging dead letters"):
            for parts in self._parts:
                for part in parts:
                    purged += int(self._script(part, "purge")(keys=[part.dead], args=[part.base]))
        return purged

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Push the local window, optionally drain Redis, and close owned clients; idempotent.

        ``incr`` is refused from the first call on. A close that fails loses nothing and may be
        called again.

        :raises BackendError: Redis failed; rows of the local window that could not be pushed
            are kept in this process, and calling ``close()`` (or ``drain()``) again pushes them.
        """
        with self._close_lock:
            if self._close_done:
                return
            self._closed = True
            try:
                if self._window_flusher is not None:
                    self._window_flusher.stop(drain=False)
                if self._window is not None:
                    self._push_window()
                    self._window.close()
                if self.drain_on_close:
                    self._run(drain=True)
            finally:
                with self._thread_conns_lock:
                    conns = list(self._thread_conns)
                for conn in conns:
                    conn.disconnect()
            self._close_done = True
            if self._owned:
                for c in self._clients:
                    _close_client(c)


class _LockedWindow:
    """The local window as its flusher thread drives it: under the buffer's window lock."""

    def __init__(self, window: MemoryBuffer, lock: threading.Lock) -> None:
        self._window = window
        self._lock = lock

    def process_pending(self) -> int:
        with self._lock:
            return self._window.process_pending()

    def drain(self) -> int:
        with self._lock:
            return self._window.drain()


def _flat(raw: Any) -> list[bytes]:
    """HGETALL replies come as dicts from some clients and flat lists from scripts."""
    if isinstance(raw, Mapping):
        return [x for pair in raw.items() for x in pair]
    return list(cast("Sequence[bytes]", raw))


_OPERATIONS = {
    "c": "columns",
    "e": "extra",
    "g": "greatest",
    "l": "least",
    "G": "greatest",
    "L": "least",
}


# The first byte of an order key (_order_key) names its family.
_FAMILIES = {
    b"n": "int, float or Decimal",
    b"t": "datetime.datetime",
    b"d": "datetime.date",
    b"s": "str",
    b"b": "bytes",
    b"u": "uuid.UUID",
}


def _rejection(code: str, field: str) -> InvalidUpdateError:
    kind, _, name = field.partition(":")
    label = _OPERATIONS.get(kind, kind)
    where = f"{label}[{name!r}]"
    if code.startswith("conflict="):
        other = code.partition("=")[2]
        return conflicting_operations(name, _OPERATIONS.get(other, other), label)
    if code == "overflow":
        return InvalidUpdateError(
            f"{where}: the buffered sum would overflow signed 64-bit; the update was not stored",
            field=where,
            expected="sum in [-2**63, 2**63-1]",
            got="int",
        )
    if code == "nonfinite":
        return InvalidUpdateError(
            f"{where}: the buffered float sum would not be finite; the update was not stored",
            field=where,
            expected="finite float sum",
            got="float",
        )
    return InvalidUpdateError(
        f"{where}: cannot compare the new value with the buffered one of another type; "
        "a column must keep one type",
        field=where,
        expected="the buffered value's type",
        got="another type",
    )
