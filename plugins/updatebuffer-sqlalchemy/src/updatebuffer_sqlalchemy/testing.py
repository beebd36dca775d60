"""Start a throwaway PostgreSQL cluster for tests and benchmarks.

:class:`PostgresServer` runs ``initdb`` into a temporary directory and then ``postgres`` as a
child process on a free 127.0.0.1 port, and stops it by pid (the lifecycle of
:class:`updatebuffer.testing.process.ServerProcess`, shared with
:class:`updatebuffer.testing.servers.RedisServer`). It never touches a server it did not start,
so the machine's own PostgreSQL on port 5432 is safe.

``initdb`` refuses to run as root. When this process is root, the cluster is created and run as an
unprivileged user (``postgres`` when it exists, else ``nobody``) that owns the temporary directory.

Example::

    from updatebuffer_sqlalchemy.testing import PostgresServer

    with PostgresServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)  # postgresql+psycopg://postgres@127.0.0.1:PORT/postgres

The binaries are found through ``UPDATEBUFFER_PG_BINDIR``, then ``pg_config --bindir``, then
``/usr/lib/postgresql/<newest>/bin``, then ``PATH``. The module needs neither a driver nor pytest
(pytest is imported only by :func:`skip_or_fail_without_postgres`).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING, ClassVar

from updatebuffer.testing.process import ServerProcess, free_port

if TYPE_CHECKING:
    from collections.abc import Mapping

    from typing_extensions import Self

__all__ = [
    "PG_BINDIR_ENV",
    "TEST_URL_ENV",
    "PostgresNotAvailableError",
    "PostgresServer",
    "PostgresStartupError",
    "find_pg_bindir",
    "skip_or_fail_without_postgres",
]

PG_BINDIR_ENV = "UPDATEBUFFER_PG_BINDIR"
"""Environment variable naming the directory that holds ``initdb`` and ``postgres``."""

TEST_URL_ENV = "UPDATEBUFFER_TEST_POSTGRES_URL"
"""Environment variable with the URL of an existing PostgreSQL server the tests may use instead."""

# Settings for a disposable cluster: durability is pointless for data that is deleted at stop, and
# turning it off keeps the test suite fast. Pass settings=... to override (the benchmark does).
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "64MB",
}

_START_ATTEMPTS = 5
_STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
_READY_MARKER = "database system is ready to accept connections"
_BIND_FAILURE_MARKERS = ("could not bind", "Address already in use", "could not create any TCP")
_LOG_TAIL_LINES = 25


class PostgresNotAvailableError(RuntimeError):
    """The PostgreSQL server binaries (``initdb``, ``postgres``) cannot be found."""


class PostgresStartupError(RuntimeError):
    """``initdb`` failed, or the server did not become ready in time."""


def find_pg_bindir() -> str | None:
    """Return the directory holding ``initdb`` and ``postgres``, or ``None`` when there is none."""
    candidates: list[str] = []
    override = os.environ.get(PG_BINDIR_ENV)
    if override:
        candidates.append(override)
    else:
        pg_config = shutil.which("pg_config")
        if pg_config is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
                )
                candidates.append(out.stdout.strip())
        # Debian keeps the server binaries off PATH, one directory per major version.
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        versions.sort(key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
        candidates.extend(reversed(versions))
        on_path = shutil.which("initdb")
        if on_path is not None:
            candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, b), os.X_OK) for b in ("initdb", "postgres")):
            return bindir
    return None


def _not_available_message() -> str:
    override = os.environ.get(PG_BINDIR_ENV)
    if override:
        return f"{PG_BINDIR_ENV}={override!r} does not hold initdb and postgres; fix or unset it."
    return (
        "PostgreSQL server binaries (initdb, postgres) were not found via pg_config, "
        "/usr/lib/postgresql/*/bin or PATH. Install them (`apt-get install postgresql`), set "
        f"{PG_BINDIR_ENV}, or point {TEST_URL_ENV} at an existing server."
    )


def _run_as() -> pwd.struct_passwd | None:
    """Return the unprivileged account to run initdb/postgres as (``None``: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresNotAvailableError(
        "running as root, and neither a 'postgres' nor a 'nobody' account exists to run "
        "initdb/postgres as (PostgreSQL refuses to run as root)"
    )


class PostgresServer(ServerProcess):
    """A disposable PostgreSQL cluster on a free 127.0.0.1 port, in a temporary directory it owns.

    Use it as a context manager or call :meth:`start` and :meth:`stop`. The superuser is
    ``postgres`` with trust authentication on loopback only; :attr:`url` is a SQLAlchemy URL for
    psycopg 3.

    :param settings: server settings (``-c name=value``); default :data:`DEFAULT_SETTINGS`
        (durability off, for speed). Given settings are merged over the defaults.
    :param startup_timeout: seconds to wait for ``initdb`` plus server readiness.
    :param driver: the SQLAlchemy driver name used in :attr:`url`.
    """

    _dir_prefix = "updatebuffer-pg-"
    _log_name = "postgres.log"
    _bind_failure_markers = _BIND_FAILURE_MARKERS
    _live: ClassVar[set[ServerProcess]] = set()
    _poll_interval = _POLL_INTERVAL

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        driver: str = "psycopg",
    ) -> None:
        super().__init__(port=free_port(), startup_timeout=startup_timeout)
        self.settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.driver = driver

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database: ``postgresql+psycopg://...``."""
        return f"postgresql+{self.driver}://postgres@{self.host}:{self.port}/postgres"

    def start(self) -> Self:
        """Create the cluster, start the server and wait until it accepts connections.

        :raises PostgresNotAvailableError: the binaries cannot be found.
        :raises PostgresStartupError: ``initdb`` failed or the server was not ready in time.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        bindir = find_pg_bindir()
        if bindir is None:
            raise PostgresNotAvailableError(_not_available_message())
        account = _run_as()
        self._make_dir()
        try:
            if account is not None:
                os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._initdb(bindir, account)
            attempt = 1
            while not self._try_start(bindir, account):
                if attempt == _START_ATTEMPTS:
                    raise PostgresStartupError(
                        f"postgres could not bind a free port after {attempt} attempts\n"
                        f"{self._log_tail()}"
                    )
                attempt += 1
                self.port = free_port()
        except BaseException:
            self.stop(fast=True)
            raise
        return self

    def stop(self, *, fast: bool = True) -> None:
        """Stop the server (SIGINT: fast shutdown, then SIGKILL) and remove its directory.

        Safe to call more than once and on a server that never started.

        :param fast: if false, wait up to 30 s for the fast shutdown before killing.
        """
        self._terminate(signal.SIGINT)  # "fast" shutdown: roll back sessions, exit
        self._reap(timeout=10.0 if fast else _STOP_TIMEOUT)
        self._remove_dir()

    # -- internals ------------------------------------------------------------------------------

    def _env(self, account: pwd.struct_passwd | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if account is not None:
            env["HOME"] = self._dir or "/"
            env["USER"] = env["LOGNAME"] = account.pw_name
        return env

    def _initdb(self, bindir: str, account: pwd.struct_passwd | None) -> None:
        cmd = [
            os.path.join(bindir, "initdb"),
            "-D",
            os.path.join(self.dir, "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",  # the cluster is thrown away; fsyncing its files only costs time
        ]
        try:
            done = subprocess.run(
                cmd,
                cwd=self.dir,
                env=self._env(account),
                capture_output=True,
                text=True,
                timeout=self.startup_timeout,
                check=False,
                user=None if account is None else account.pw_uid,
                group=None if account is None else account.pw_gid,
                extra_groups=None if account is None else [],
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresStartupError(
                f"initdb timed out after {self.startup_timeout:g} s"
            ) from exc
        if done.returncode != 0:
            raise PostgresStartupError(
                f"initdb exited with status {done.returncode}: {' '.join(cmd)}\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )

    def _spawn(self, bindir: str, account: pwd.struct_passwd | None) -> None:
        args = [
            os.path.join(bindir, "postgres"),
            "-D",
            os.path.join(self.dir, "data"),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"unix_socket_directories={self.dir}",
        ]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        if account is not None:
            # Created first so that the account owns it before the server starts.
            with open(self.logfile, "ab"):
                pass
            os.chown(self.logfile, account.pw_uid, account.pw_gid)
        self._launch(
            args,
            env=self._env(account),
            start_new_session=True,  # a Ctrl-C in the terminal must not shut it down early
            user=None if account is None else account.pw_uid,
            group=None if account is None else account.pw_gid,
            extra_groups=None if account is None else [],
        )
        # Read the whole log, earlier attempts' lines included, in the readiness and bind-failure
        # checks and in error messages.
        self._log_offset = 0

    def _try_start(self, bindir: str, account: pwd.struct_passwd | None) -> bool:
        """Spawn the server and wait for it; return false if another process took the port."""
        self._spawn(bindir, account)
        if self._wait_ready():
            return True
        self._reap(kill=True)
        return False

    def _ready(self, pid: int) -> bool:
        return _READY_MARKER in self._read_log()

    def _exited_error(self, code: int) -> PostgresStartupError:
        return PostgresStartupError(
            f"postgres exited with status {code} while starting on "
            f"{self.host}:{self.port}\n{self._log_tail()}"
        )

    def _not_ready_error(self, pid: int) -> PostgresStartupError:
        return PostgresStartupError(
            f"postgres (pid {pid}) was not ready on {self.host}:{self.port} within "
            f"{self.startup_timeout:g} s\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        lines = self._read_log().splitlines()[-_LOG_TAIL_LINES:]
        return "--- last lines of the postgres log ---\n" + ("\n".join(lines) or "(empty)")

    def _force_exit(self, proc: subprocess.Popen[bytes]) -> None:
        # SIGQUIT makes the postmaster take its backends down with it; SIGKILL would orphan them
        # holding the shared memory segment.
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            super()._force_exit(proc)

    def _reap_at_exit(self) -> None:
        # A slow but clean shutdown (see _force_exit): SIGKILL would orphan the backends.
        self.stop(fast=False)


atexit.register(PostgresServer._reap_leftovers)


def skip_or_fail_without_postgres() -> None:
    """Skip the calling test when PostgreSQL cannot be found; fail instead when ``CI=true``.

    A CI run that silently skipped every PostgreSQL test would look green while testing nothing.
    """
    # Imported here: only test code calls this, and the module must not need pytest.
    import pytest

    if os.environ.get(TEST_URL_ENV) or find_pg_bindir() is not None:
        return
    message = _not_available_message()
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)
