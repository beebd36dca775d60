"""The lifecycle shared by the throwaway servers that tests start as child processes.

:class:`ServerProcess` is the base of :class:`updatebuffer.testing.servers.RedisServer` and of
plugin servers such as ``updatebuffer_sqlalchemy.testing.PostgresServer``. It owns what they have
in common: a temporary directory per server, a child process started in it with its output in a
log file there, the wait for readiness against a deadline, stopping by pid (a signal, a wait, then
SIGKILL), and the ``atexit`` safety net that reaps the servers still running when the interpreter
exits. A subclass says how to launch its binary and how to tell that it is ready.

Nothing here connects to anything or needs a third-party package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from typing_extensions import Self

__all__ = ["HOST", "ServerProcess", "free_port"]

HOST = "127.0.0.1"
"""The only interface the servers listen on."""

_REDIS_DEFAULT_PORT = 6379
_STOP_TIMEOUT = 10.0
_LIVE_LOCK = threading.Lock()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (never 6379, Redis's default).

    The port is found by binding port 0 and closing the socket, so another process may take it
    before it is used: a server's ``start()`` retries on a new port when its bind fails.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port != _REDIS_DEFAULT_PORT:
            return port


class _StartStop:
    """``with`` support for test servers: ``__enter__`` starts, ``__exit__`` stops."""

    def start(self) -> Self:
        """Start and return ``self``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop; safe to call more than once."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ServerProcess(_StartStop):
    """A server child process on a 127.0.0.1 port, with a temporary directory it owns.

    Use a subclass as a context manager or call :meth:`start` and :meth:`stop`. The base class
    holds the process and the directory; a subclass implements :meth:`start` and the hooks below.
    Members with one leading underscore are this interface for subclasses, not for callers.

    Class attributes a subclass sets:

    - ``_dir_prefix``: prefix of the temporary directory's name.
    - ``_log_name``: name of the log file in :attr:`dir`; the child's stdout and stderr go there.
    - ``_bind_failure_markers``: log lines that show the server exited because its port was taken.
    - ``_live``: its own empty set, the servers of this kind that have a process or a directory;
      the defining module registers ``cls._reap_leftovers`` with :func:`atexit.register`.
    - ``_poll_interval``: seconds between readiness checks (default 0.01).

    Methods a subclass implements: ``_ready(pid)`` (is the process *pid* ready?),
    ``_exited_error(code)`` and ``_not_ready_error(pid)`` (the exceptions to raise when it exits
    while starting or is not ready within :attr:`startup_timeout`). It may override
    ``_force_exit(proc)`` (how to end a process that ignored :meth:`stop`'s signal) and
    ``_reap_at_exit()`` (what the ``atexit`` safety net does to a leftover server).

    A typical ``start()``: ``_make_dir()``, then ``_launch(args)`` and ``_wait_ready()``, retried
    on a new port while ``_wait_ready()`` returns false; on failure ``_reap(kill=True)`` and
    ``_remove_dir()``.

    :param port: the port the server listens on (see :func:`free_port`).
    :param startup_timeout: seconds to wait for the server to become ready.
    """

    _dir_prefix: ClassVar[str]
    _log_name: ClassVar[str]
    _bind_failure_markers: ClassVar[tuple[str, ...]]
    _live: ClassVar[set[ServerProcess]]
    _poll_interval: ClassVar[float] = 0.01

    def __init__(self, *, port: int, startup_timeout: float) -> None:
        self.host: str = HOST
        self.port: int = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = f"pid={self._proc.pid}" if self.running and self._proc else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    # -- attributes -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The process id of the running server.

        :raises RuntimeError: if the server is not running.
        """
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        return self._proc.pid

    @property
    def dir(self) -> str:
        """The temporary directory the server owns (its data and :attr:`logfile`).

        It exists from :meth:`start` until :meth:`stop`.

        :raises RuntimeError: if the server was never started or has been stopped.
        """
        if self._dir is None:
            raise RuntimeError(f"{self!r} has no directory: it was never started or is stopped")
        return self._dir

    @property
    def logfile(self) -> str:
        """The path of the server's log file in :attr:`dir`.

        :raises RuntimeError: if the server was never started or has been stopped.
        """
        return os.path.join(self.dir, self._log_name)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait until it is ready; return the server."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its directory.

        Safe to call more than once and on a server that was never started or was killed.
        """
        self._terminate()
        self._reap()
        self._remove_dir()

    # -- for subclasses: the directory ----------------------------------------------------------

    def _make_dir(self) -> None:
        """Create a fresh temporary directory and track the server for the atexit safety net."""
        self._dir = tempfile.mkdtemp(prefix=self._dir_prefix)
        self._log_offset = 0
        with _LIVE_LOCK:
            self._live.add(self)

    def _remove_dir(self) -> None:
        """Remove the directory; a server with neither process nor directory is untracked."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._proc is None:
            self._untrack()

    def _untrack(self) -> None:
        with _LIVE_LOCK:
            self._live.discard(self)

    # -- for subclasses: the process ------------------------------------------------------------

    def _launch(self, args: Sequence[str], **popen: Any) -> None:
        """Start the child process in :attr:`dir`; *popen* adds keyword arguments to Popen.

        stdout and stderr are appended to :attr:`logfile` so that what the server prints before
        it opens a log of its own (a fatal configuration error) lands next to everything else.
        :meth:`_read_log` reads from where the log ended before this launch.
        """
        logfile = self.logfile
        self._log_offset = os.path.getsize(logfile) if os.path.exists(logfile) else 0
        with open(logfile, "ab") as log:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir, **popen
            )

    def _wait_ready(self) -> bool:
        """Wait until ``_ready(pid)``; return false if the server exited because its port was taken.

        :raises Exception: ``_exited_error(code)`` if the server exited for another reason,
            ``_not_ready_error(pid)`` if it was not ready within :attr:`startup_timeout`.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("_wait_ready() called before _launch()")
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = proc.poll()
            if code is not None:
                log = self._read_log()
                if any(marker in log for marker in self._bind_failure_markers):
                    return False
                raise self._exited_error(code)
            if self._ready(proc.pid):
                return True
            if time.monotonic() >= deadline:
                raise self._not_ready_error(proc.pid)
            time.sleep(self._poll_interval)

    def _ready(self, pid: int) -> bool:
        """Whether the server process *pid*, still alive, is ready for clients."""
        raise NotImplementedError

    def _exited_error(self, code: int) -> Exception:
        """Return the error for a server that exited with status *code* while starting."""
        raise NotImplementedError

    def _not_ready_error(self, pid: int) -> Exception:
        """Return the error for a server (process *pid*) not ready within the startup timeout."""
        raise NotImplementedError

    def _read_log(self) -> str:
        """Return the log written since the last :meth:`_launch` (``""`` when there is none)."""
        if self._dir is None:
            return ""
        try:
            with open(self.logfile, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _terminate(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send *sig* to the process if it is alive, without waiting for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def _reap(self, *, kill: bool = False, timeout: float = _STOP_TIMEOUT) -> None:
        """Wait for the process to exit (SIGKILL it first if *kill*) and forget it.

        A process still alive after *timeout* seconds is ended by :meth:`_force_exit`.
        """
        proc = self._proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._force_exit(proc)
        self._proc = None
        if self._dir is None:
            self._untrack()

    def _force_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """End a process that did not exit in time: SIGKILL, then wait."""
        proc.kill()
        proc.wait()

    # -- for subclasses: the atexit safety net --------------------------------------------------

    def _reap_at_exit(self) -> None:
        """Kill the process with SIGKILL and remove the directory."""
        try:
            self._reap(kill=True)
        finally:
            self._remove_dir()

    @classmethod
    def _reap_leftovers(cls) -> None:
        """Reap every server in ``cls._live``; registered with :mod:`atexit` by each kind."""
        with _LIVE_LOCK:
            servers = list(cls._live)
        for server in servers:
            # Best effort at interpreter exit: one broken server must not keep the others alive.
            with contextlib.suppress(Exception):
                server._reap_at_exit()
