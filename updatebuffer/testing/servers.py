"""Start real ``redis-server`` processes for tests and benchmarks.

The servers run as child processes on free loopback ports, each with a temporary directory it
owns, and are stopped by pid (getsentry/rb's ``rb/testing.py``, cachelib's test fixtures); that
lifecycle is :class:`updatebuffer.testing.process.ServerProcess`, shared with other servers. Nothing
here ever connects to a server it did not start, so a developer's own Redis on port 6379 is safe.
The module needs neither redis-py nor pytest: readiness is checked over a raw socket and pytest is
imported only by :func:`skip_or_fail_without_redis`.

Example::

    from updatebuffer.testing.servers import RedisCluster, RedisServer

    with RedisServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        ...
        server.restart()  # same port, same data directory: the AOF brings the data back

    with RedisCluster(masters=3) as cluster:
        client = redis.cluster.RedisCluster(host=cluster.host, port=cluster.port)

``UPDATEBUFFER_REDIS_SERVER`` and ``UPDATEBUFFER_REDIS_CLI`` select the binaries when they are not
on ``PATH``. An ``atexit`` hook kills every server this module started that is still running when
the interpreter exits.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, ClassVar, TypeAlias

from updatebuffer.testing.process import HOST, ServerProcess, _StartStop, free_port

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from types import TracebackType

    from typing_extensions import Self

__all__ = [
    "HOST",
    "REDIS_CLI_ENV",
    "REDIS_SERVER_ENV",
    "RedisCluster",
    "RedisNodes",
    "RedisNotAvailableError",
    "RedisServer",
    "RedisStartupError",
    "RespValue",
    "TLSFiles",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
    "skip_or_fail_without_redis",
]

REDIS_SERVER_ENV = "UPDATEBUFFER_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary (overrides ``PATH``)."""

REDIS_CLI_ENV = "UPDATEBUFFER_REDIS_CLI"
"""Environment variable naming the ``redis-cli`` binary (overrides ``PATH``)."""

RespValue: TypeAlias = "str | int | bytes | list[RespValue] | None"
"""A decoded RESP2 reply: simple string, integer, bulk string (or nil), or array."""

# Redis Cluster nodes also listen on port + 10000 for the cluster bus.
_CLUSTER_BUS_OFFSET = 10000
_CLUSTER_SLOTS = 16384
_DEFAULT_PORT = 6379
_MAX_PORT = 65535
# A free port can be taken by another process between free_port() and redis-server's bind().
_START_ATTEMPTS = 5
_BIND_FAILURE_MARKERS = ("Address already in use", "Failed listening on port")
_LOG_TAIL_LINES = 20
_PROBE_TIMEOUT = 2.0
_POLL_INTERVAL = 0.01


class RedisNotAvailableError(RuntimeError):
    """The ``redis-server`` (or ``redis-cli``) binary cannot be found.

    :param message: which binary is missing and how to provide it.
    """


class RedisStartupError(RuntimeError):
    """A server or cluster did not start or did not become ready in time.

    :param message: what failed, with the last lines of the server's log when there is one.
    """


class _ReplyError(RuntimeError):
    """The server answered a command with a RESP error reply."""


# ---------------------------------------------------------------------------------------------
# Binaries and ports


def _find_binary(name: str, env: str) -> str | None:
    override = os.environ.get(env)
    if override:
        # which() accepts a bare name or a path and checks that it is an executable file.
        return shutil.which(override)
    return shutil.which(name)


def _not_available_message(name: str, env: str) -> str:
    override = os.environ.get(env)
    if override:
        return f"{env}={override!r} does not name an executable {name} binary; fix or unset it."
    return (
        f"{name} was not found on PATH. Install Redis (for example `apt-get install redis-server`"
        f" or `brew install redis`) or set {env} to the path of the {name} binary."
    )


def find_redis_server() -> str | None:
    """Return the path of the ``redis-server`` binary, or ``None`` when there is none.

    ``UPDATEBUFFER_REDIS_SERVER`` (a path or a command name) takes precedence over ``PATH``.
    """
    return _find_binary("redis-server", REDIS_SERVER_ENV)


def find_redis_cli() -> str | None:
    """Return the path of the ``redis-cli`` binary, or ``None`` when there is none.

    ``UPDATEBUFFER_REDIS_CLI`` takes precedence; then a ``redis-cli`` next to the binary
    :func:`find_redis_server` found (a source build keeps both in ``src/``); then ``PATH``.
    """
    if os.environ.get(REDIS_CLI_ENV):
        return _find_binary("redis-cli", REDIS_CLI_ENV)
    server = find_redis_server()
    if server is not None:
        sibling = shutil.which(os.path.join(os.path.dirname(server), "redis-cli"))
        if sibling is not None:
            return sibling
    return shutil.which("redis-cli")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option redis-server uses, so a port in TIME_WAIT (a restart) counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_cluster_port() -> int:
    """Return a free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        bus = port + _CLUSTER_BUS_OFFSET
        if bus <= _MAX_PORT and bus != _DEFAULT_PORT + _CLUSTER_BUS_OFFSET and _port_is_free(bus):
            return port


def _enables_cluster(args: Sequence[str]) -> bool:
    return any(
        flag == "--cluster-enabled" and value.lower() == "yes"
        for flag, value in itertools.pairwise(args)
    )


# ---------------------------------------------------------------------------------------------
# A tiny RESP2 client: enough for PING, INFO and CLUSTER INFO without redis-py.


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: BinaryIO) -> RespValue:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed while reading a reply")
    kind, payload = line[:1], line[1:-2]
    if kind == b"+":
        return payload.decode()
    if kind == b"-":
        raise _ReplyError(payload.decode(errors="replace"))
    if kind == b":":
        return int(payload)
    if kind == b"$":
        size = int(payload)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed while reading a bulk reply")
        return data[:-2]
    if kind == b"*":
        size = int(payload)
        if size < 0:
            return None
        return [_read_reply(stream) for _ in range(size)]
    raise ConnectionError(f"unexpected RESP reply type {kind!r}")


class _Connection:
    """One short-lived RESP connection; always used as a context manager."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self._reader: BinaryIO = self._sock.makefile("rb")
        except BaseException:
            self._sock.close()
            raise

    def call(self, *args: str | bytes | int) -> RespValue:
        self._sock.sendall(_encode_command(args))
        return _read_reply(self._reader)

    def __enter__(self) -> _Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._reader.close()
        self._sock.close()


def _parse_info(reply: RespValue) -> dict[str, str]:
    """Parse the ``field:value`` lines of an INFO or CLUSTER INFO reply."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    info: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            field, sep, value = line.partition(":")
            if sep:
                info[field] = value
    return info


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass(frozen=True)
class TLSFiles:
    """PEM files a TLS ``redis-server`` uses: its certificate and key, and the CA it trusts.

    :param cert_file: the server's certificate (chain).
    :param key_file: the server's private key.
    :param ca_cert_file: the CA whose client certificates the server accepts; clients need not
        present one (``--tls-auth-clients optional``).
    """

    cert_file: str
    key_file: str
    ca_cert_file: str


class RedisServer(ServerProcess):
    """A ``redis-server`` child process on a free 127.0.0.1 port, with a temp directory it owns.

    The server runs with ``--save ""`` (no RDB snapshots) and, when ``appendonly`` is true, with
    ``--appendonly yes --appendfsync always`` so that every acknowledged write survives
    :meth:`restart` and even :meth:`kill`. Use it as a context manager or call :meth:`start` and
    :meth:`stop`; :attr:`url` is ``redis://127.0.0.1:PORT/0``. Its :attr:`dir` (data, AOF,
    ``nodes.conf`` and the :attr:`logfile` ``redis.log``) stays across :meth:`restart` and after
    :meth:`kill`.

    :param port: the port to listen on. By default a free port is chosen (and replaced by another
        one if some other process takes it first); an explicit port is used as given and must be
        free.
    :param appendonly: enable the append-only file, fsynced on every write.
    :param extra_args: more ``redis-server`` command-line arguments (``["--maxmemory", "10mb"]``),
        placed after the built-in ones so they override them.
    :param startup_timeout: seconds to wait for the server to answer ``PING``.
    :param unixsocket: also listen on the Unix socket :attr:`unix_socket_path` (``redis.sock`` in
        the server's directory).
    :param tls: also listen with TLS on a second free port, :attr:`tls_port`, with these files.
    :raises ValueError: if ``port`` is out of range or ``extra_args`` is a single string.
    """

    _dir_prefix = "updatebuffer-redis-"
    _log_name = "redis.log"
    _bind_failure_markers = _BIND_FAILURE_MARKERS
    _live: ClassVar[set[ServerProcess]] = set()
    _poll_interval = _POLL_INTERVAL

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        unixsocket: bool = False,
        tls: TLSFiles | None = None,
    ) -> None:
        if isinstance(extra_args, str):
            raise ValueError(
                f"extra_args must be a sequence of arguments, not the string {extra_args!r}"
            )
        self.appendonly = appendonly
        self.unixsocket = unixsocket
        self.tls = tls
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self._cluster_bus = _enables_cluster(self.extra_args)
        #: The TLS port (``None`` without *tls*); the plain port stays open for readiness checks.
        self.tls_port: int | None = None if tls is None else self._pick_port()
        if port is not None:
            limit = _MAX_PORT - _CLUSTER_BUS_OFFSET if self._cluster_bus else _MAX_PORT
            if not 0 < port <= limit:
                raise ValueError(f"port must be in 1..{limit}, got {port}")
        # Once the server has run, its port is fixed: restarts must come back where clients
        # (and cluster peers) expect it.
        self._port_fixed = port is not None
        super().__init__(
            port=port if port is not None else self._pick_port(), startup_timeout=startup_timeout
        )

    # -- attributes -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``redis://127.0.0.1:PORT/0`` URL of this server."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def unix_socket_path(self) -> str | None:
        """The Unix socket the server listens on (``None`` without ``unixsocket=True``).

        :raises RuntimeError: if the server has no directory yet (never started).
        """
        return os.path.join(self.dir, "redis.sock") if self.unixsocket else None

    @property
    def tls_url(self) -> str | None:
        """The ``rediss://127.0.0.1:TLS_PORT/0`` URL (``None`` without *tls*)."""
        return None if self.tls_port is None else f"rediss://{self.host}:{self.tls_port}/0"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it answers ``PING``; return the server.

        After :meth:`kill`, this starts the server again on the same port and directory.

        :raises RuntimeError: if the server is already running.
        :raises RedisNotAvailableError: if ``redis-server`` cannot be found.
        :raises RedisStartupError: if the server exits or is not ready within ``startup_timeout``.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        binary = find_redis_server()
        if binary is None:
            raise RedisNotAvailableError(_not_available_message("redis-server", REDIS_SERVER_ENV))
        fresh = self._dir is None
        if fresh:
            self._make_dir()
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                if self._port_fixed:
                    self._check_fixed_port_free()
                self._launch(self._command_line(binary))
                if self._wait_ready():
                    break
                self._reap()
                if self._port_fixed or attempt == _START_ATTEMPTS:
                    raise RedisStartupError(
                        f"redis-server could not bind 127.0.0.1:{self.port} after {attempt}"
                        f" attempt(s):\n{self._log_tail()}"
                    )
                # A fresh directory too: a cluster node already wrote nodes.conf for the port it
                # failed to take.
                self._remove_dir()
                self._make_dir()
                self.port = self._pick_port()
                if self.tls_port is not None:
                    self.tls_port = self._pick_port()
        except BaseException:
            self._reap(kill=True)
            if fresh:
                self._remove_dir()
            raise
        self._port_fixed = True
        return self

    def restart(self) -> None:
        """Stop the server with SIGTERM, wait for it to exit, and start it on the same port and dir.

        Data written before the restart survives only with ``appendonly=True``.

        :raises RuntimeError: if the server was never started or has been stopped.
        :raises RedisStartupError: if the server does not come back.
        """
        if self._dir is None:
            raise RuntimeError(f"{self!r} cannot restart: it was never started or is stopped")
        self._terminate()
        self._reap()
        self.start()

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash) and reap it; keep its port and directory.

        :meth:`start` brings it back with whatever the AOF recorded; :meth:`stop` cleans up.
        """
        self._reap(kill=True)

    # -- talking to the server ------------------------------------------------------------------

    def execute(self, *args: str | bytes | int, timeout: float = 5.0) -> RespValue:
        """Send one command over a fresh raw connection and return the decoded reply.

        A convenience for tests that must not depend on redis-py: ``server.execute("DBSIZE")``.

        :param args: the command and its arguments.
        :param timeout: socket timeout in seconds.
        :raises RuntimeError: if the server replies with an error.
        :raises OSError: if the server cannot be reached.
        """
        with _Connection(self.host, self.port, timeout) as conn:
            return conn.call(*args)

    def info(self, section: str | None = None) -> dict[str, str]:
        """Return ``INFO`` (or one section of it) as a ``{field: value}`` mapping.

        :param section: an INFO section such as ``"server"`` or ``"replication"``.
        :raises RuntimeError: if the server replies with an error.
        :raises OSError: if the server cannot be reached.
        """
        return _parse_info(self.execute("INFO", *(() if section is None else (section,))))

    # -- internals ------------------------------------------------------------------------------

    def _pick_port(self) -> int:
        return _free_cluster_port() if self._cluster_bus else free_port()

    def _check_fixed_port_free(self) -> None:
        ports = [self.port]
        if self._cluster_bus:
            ports.append(self.port + _CLUSTER_BUS_OFFSET)
        # Checked up front so that a server already listening there is never even pinged.
        busy = [port for port in ports if not _port_is_free(port)]
        if busy:
            raise RedisStartupError(
                f"cannot start redis-server on 127.0.0.1:{self.port}: port(s)"
                f" {', '.join(map(str, busy))} already in use by another process"
            )

    def _command_line(self, binary: str) -> list[str]:
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--save",
            "",
            "--dir",
            self.dir,
            "--logfile",
            self.logfile,
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        if self.unixsocket:
            args += [
                "--unixsocket",
                os.path.join(self.dir, "redis.sock"),
                "--unixsocketperm",
                "700",
            ]
        if self.tls is not None:
            args += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                self.tls.cert_file,
                "--tls-key-file",
                self.tls.key_file,
                "--tls-ca-cert-file",
                self.tls.ca_cert_file,
                "--tls-auth-clients",
                "optional",
            ]
        args += self.extra_args
        return args

    def _exited_error(self, code: int) -> RedisStartupError:
        return RedisStartupError(
            f"redis-server exited with status {code} while starting on"
            f" 127.0.0.1:{self.port}\ncommand: {self._command_line('redis-server')}\n"
            f"{self._log_tail()}"
        )

    def _not_ready_error(self, pid: int) -> RedisStartupError:
        return RedisStartupError(
            f"redis-server (pid {pid}) did not answer PING on 127.0.0.1:{self.port}"
            f" within {self.startup_timeout:g} s\n{self._log_tail()}"
        )

    def _ready(self, pid: int) -> bool:
        """Whether *our* process answers on the port (not some other server that holds it)."""
        try:
            with _Connection(self.host, self.port, _PROBE_TIMEOUT) as conn:
                info = _parse_info(conn.call("INFO", "server"))
                if info.get("process_id") != str(pid):
                    return False
                # PING fails with -LOADING until the AOF is loaded, while INFO already answers.
                return conn.call("PING") == "PONG"
        except (OSError, ValueError, _ReplyError):
            return False

    def _log_tail(self) -> str:
        if self._dir is None:
            return "(no log)"
        lines = self._read_log().splitlines()[-_LOG_TAIL_LINES:]
        body = "\n".join(lines) if lines else "(empty)"
        return f"--- last lines of {self.logfile} ---\n{body}"


# The atexit safety net kills every server this module started that is still alive and removes
# its directory.
_LIVE = RedisServer._live
_cleanup_at_exit = RedisServer._reap_leftovers
atexit.register(_cleanup_at_exit)


def _stop_all(servers: Iterable[RedisServer]) -> None:
    """Stop several servers in parallel: SIGTERM them all first, then wait for each."""
    servers = list(servers)
    for server in servers:
        server._terminate()
    # Not stop(): a second SIGTERM makes a shutting-down redis-server exit without finishing.
    for server in servers:
        try:
            server._reap()
        finally:
            server._remove_dir()


class RedisNodes(_StartStop):
    """Several independent ``redis-server`` processes (N nodes for a partition router).

    :param n: how many servers to run.
    :param appendonly: passed to every :class:`RedisServer`.
    :param extra_args: passed to every :class:`RedisServer`.
    :param startup_timeout: passed to every :class:`RedisServer`.
    :raises ValueError: if ``n`` is less than 1.
    """

    def __init__(
        self,
        n: int = 2,
        *,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        if n < 1:
            raise ValueError(f"RedisNodes needs at least one server, got n={n}")
        self.servers: list[RedisServer] = [
            RedisServer(
                appendonly=appendonly, extra_args=extra_args, startup_timeout=startup_timeout
            )
            for _ in range(n)
        ]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {[server.port for server in self.servers]}>"

    @property
    def urls(self) -> list[str]:
        """The ``redis://`` URL of every server, in order."""
        return [server.url for server in self.servers]

    def start(self) -> Self:
        """Start every server; if one fails, stop those already started and re-raise.

        :raises RedisNotAvailableError: if ``redis-server`` cannot be found.
        :raises RedisStartupError: if a server does not start.
        """
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            _stop_all(self.servers)
            raise
        return self

    def stop(self) -> None:
        """Stop every server and remove their directories."""
        _stop_all(self.servers)


class RedisCluster(_StartStop):
    """A Redis Cluster of ``masters * (1 + replicas)`` local servers, created with ``redis-cli``.

    :meth:`start` launches the nodes with ``--cluster-enabled yes``, runs
    ``redis-cli --cluster create ... --cluster-replicas R --cluster-yes`` and waits until every
    node reports ``cluster_state:ok`` with all 16384 slots assigned (and every replica is linked
    to its master). :attr:`url` is ``redis+cluster://127.0.0.1:PORT`` of the first node.

    :param masters: the number of master nodes (at least 3, as ``redis-cli`` requires).
    :param replicas: replicas per master.
    :param appendonly: passed to every :class:`RedisServer`.
    :param extra_args: extra arguments for every node, after the cluster ones.
    :param startup_timeout: passed to every :class:`RedisServer`.
    :param ready_timeout: seconds to wait for ``redis-cli`` and for the cluster to converge.
    :param tls: every node also listens with TLS (:attr:`tls_url`) and the nodes talk TLS to
        each other; ``redis-cli`` and the readiness checks keep the plain ports.
    :raises ValueError: if ``masters`` is less than 3 or ``replicas`` is negative.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        ready_timeout: float = 60.0,
        tls: TLSFiles | None = None,
    ) -> None:
        if masters < 3:
            raise ValueError(
                f"a Redis Cluster needs at least 3 masters (redis-cli refuses fewer), got {masters}"
            )
        if replicas < 0:
            raise ValueError(f"replicas must be 0 or more, got {replicas}")
        if isinstance(extra_args, str):
            raise ValueError(
                f"extra_args must be a sequence of arguments, not the string {extra_args!r}"
            )
        self.masters = masters
        self.replicas = replicas
        self.ready_timeout = ready_timeout
        node_args = (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
            # A master waits 5 s by default before a diskless full sync, hoping more replicas
            # join; here that only delays every replica's first sync.
            "--repl-diskless-sync-delay",
            "0",
            # With TLS the nodes announce their TLS ports to TLS clients (plain ones to plain
            # clients) and their bus listens at the TLS port + 10000.
            *(("--tls-cluster", "yes", "--tls-replication", "yes") if tls else ()),
            *extra_args,
        )
        self.tls = tls
        self.servers: list[RedisServer] = [
            RedisServer(
                appendonly=appendonly,
                extra_args=node_args,
                startup_timeout=startup_timeout,
                tls=tls,
            )
            for _ in range(masters * (1 + replicas))
        ]

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} masters={self.masters} replicas={self.replicas}"
            f" ports={[server.port for server in self.servers]}>"
        )

    @property
    def host(self) -> str:
        """The host of the first node (always ``127.0.0.1``)."""
        return self.servers[0].host

    @property
    def port(self) -> int:
        """The port of the first node, a convenient single startup node."""
        return self.servers[0].port

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, masters and replicas."""
        return [(server.host, server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """The ``redis+cluster://127.0.0.1:PORT`` URL of the first node."""
        return f"redis+cluster://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        """The ``rediss+cluster://127.0.0.1:TLS_PORT`` URL of the first node, or ``None``."""
        port = self.servers[0].tls_port
        return None if port is None else f"rediss+cluster://{self.host}:{port}"

    def start(self) -> Self:
        """Start the nodes, create the cluster and wait until it is ready; return the cluster.

        If anything fails, every node already started is stopped before the error propagates.

        :raises RedisNotAvailableError: if ``redis-server`` or ``redis-cli`` cannot be found.
        :raises RedisStartupError: if a node does not start, ``redis-cli --cluster create``
            fails, or the cluster does not converge within ``ready_timeout``.
        """
        cli = find_redis_cli()
        if cli is None:
            raise RedisNotAvailableError(_not_available_message("redis-cli", REDIS_CLI_ENV))
        try:
            for server in self.servers:
                server.start()
            self._create(cli)
            self._wait_ready()
        except BaseException:
            _stop_all(self.servers)
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        _stop_all(self.servers)

    def _create(self, cli: str) -> None:
        command = [
            cli,
            "--cluster",
            "create",
            *(f"{host}:{port}" for host, port in self.startup_nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.ready_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RedisStartupError(
                f"{' '.join(command)} did not finish within {self.ready_timeout:g} s"
            ) from exc
        if result.returncode != 0:
            raise RedisStartupError(
                f"{' '.join(command)} failed with status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        problems: list[str] = []
        while True:
            problems = [p for p in map(self._node_problem, self.servers) if p is not None]
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise RedisStartupError(
                    f"the cluster was not ready within {self.ready_timeout:g} s:\n"
                    + "\n".join(problems)
                )
            time.sleep(_POLL_INTERVAL * 5)

    def _node_problem(self, server: RedisServer) -> str | None:
        """Describe why one node is not ready yet, or return ``None`` when it is."""
        if not server.running:
            raise RedisStartupError(f"cluster node {server!r} died:\n{server._log_tail()}")
        expected = {
            "cluster_state": "ok",
            "cluster_slots_assigned": str(_CLUSTER_SLOTS),
            "cluster_slots_ok": str(_CLUSTER_SLOTS),
            "cluster_known_nodes": str(len(self.servers)),
            "cluster_size": str(self.masters),
        }
        try:
            info = _parse_info(server.execute("CLUSTER", "INFO", timeout=_PROBE_TIMEOUT))
            replication = server.info("replication")
        except (OSError, ValueError, _ReplyError) as exc:
            return f"{server.host}:{server.port}: {exc}"
        wrong = [f"{k}={info.get(k)!r} (want {v})" for k, v in expected.items() if info.get(k) != v]
        if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
            wrong.append(f"master_link_status={replication.get('master_link_status')!r} (want up)")
        return f"{server.host}:{server.port}: {', '.join(wrong)}" if wrong else None


# ---------------------------------------------------------------------------------------------
# pytest helper


def skip_or_fail_without_redis(*, cluster: bool = False) -> None:
    """Skip the calling test when Redis is not installed, but fail it when ``CI=true``.

    Call it from a fixture or test before starting a server. A developer without Redis gets a
    skip; a CI job that forgot to install Redis fails loudly instead of passing vacuously.

    :param cluster: also require ``redis-cli`` (needed by :class:`RedisCluster`).
    :raises pytest.skip.Exception: when Redis is missing outside CI.
    :raises pytest.fail.Exception: when Redis is missing and ``CI`` is ``true``.
    """
    missing = []
    if find_redis_server() is None:
        missing.append(_not_available_message("redis-server", REDIS_SERVER_ENV))
    if cluster and find_redis_cli() is None:
        missing.append(_not_available_message("redis-cli", REDIS_CLI_ENV))
    if not missing:
        return
    # Imported here, not at the top: the module must import where pytest is not installed.
    import pytest

    message = " ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and Redis is required: {message}", pytrace=False)
    pytest.skip(message)
