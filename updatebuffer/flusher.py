"""A background thread that calls ``process_pending()`` on a buffer."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Protocol

from typing_extensions import Self

from updatebuffer.errors import ConfigurationError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Flushable", "Flusher"]

log = logging.getLogger(__name__)


class Flushable(Protocol):
    """What a :class:`Flusher` drives: every :class:`~updatebuffer.Buffer` is one."""

    def process_pending(self) -> int:
        """Flush what is due; return the rows flushed."""
        ...

    def drain(self) -> int:
        """Flush everything now; return the rows flushed."""
        ...


_running: weakref.WeakSet[Flusher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Threads do not survive fork(): a child sees a Flusher that looks started but whose thread
    # is gone, and locks some parent thread may have held. Give each one fresh locks and, if it
    # was running, a thread of the child's own: the child's buffer needs flushing too.
    for flusher in list(_running):
        flusher._after_fork(restart=flusher.restart_after_fork)


_hook_registered = False


def _register_fork_hook() -> None:
    # Registered at the first start(), not at import: after-fork hooks run in registration
    # order, and a restarted thread must find its buffer already reset by the buffer's own hook
    # (registered when its module was imported, necessarily before a Flusher could drive it).
    # No lock (one could be inherited locked): two threads racing here register the hook twice,
    # which is harmless, as Flusher._after_fork runs once per process.
    global _hook_registered
    if not _hook_registered and hasattr(os, "register_at_fork"):
        _hook_registered = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


class Flusher:
    """Flush a buffer from a daemon thread until stopped.

    It calls ``buffer.process_pending()`` and sleeps *interval* seconds between calls that found
    nothing to flush; while calls keep flushing rows it loops without sleeping. :meth:`stop`
    finishes the batch in hand, then drains the buffer (unless told not to).

    Example::

        with updatebuffer.Flusher(buf, interval=1.0):
            serve_forever()

    Nothing stops the thread but :meth:`stop`: any exception from ``process_pending()``
    (a backend outage, or a ``BaseException`` such as ``SystemExit`` from the flush callback,
    whose batch the buffer keeps for redelivery) is logged, counted in :attr:`errors`, kept in
    :attr:`last_error`, and the loop goes on after *interval*.

    After ``os.fork()`` a running flusher runs in the child too, on a thread of its own (set
    :attr:`restart_after_fork` to ``False`` to keep it in the parent only).

    :param buffer: the buffer to flush.
    :param interval: seconds to sleep when a call flushed nothing (default 1.0).
    :param name: the thread name.
    """

    def __init__(
        self, buffer: Flushable, *, interval: float = 1.0, name: str = "updatebuffer-flusher"
    ) -> None:
        given: object = interval  # checked at runtime: configs often come from untyped settings
        if isinstance(given, bool) or not isinstance(given, (int, float)) or given <= 0:
            raise ConfigurationError(
                f"interval must be a positive number of seconds, got {interval!r}"
            )
        self.buffer = buffer
        self.interval = float(interval)
        self.name = name
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        #: Exceptions raised by ``process_pending`` are logged and counted here; the loop goes on.
        self.errors = 0
        #: The latest exception raised by ``process_pending`` in the thread, or ``None``.
        self.last_error: BaseException | None = None
        #: Whether a flusher running at ``fork()`` starts a thread in the child (an owner that
        #: must first reset its own state after fork starts it itself).
        self.restart_after_fork = True

    def start(self) -> Self:
        """Start the thread; starting a running flusher is an error.

        :raises RuntimeError: the flusher is already running.
        """
        _register_fork_hook()
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("Flusher already started")
            self._stopping = False
            self._pid = os.getpid()
            self._wake.clear()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
            _running.add(self)
        return self

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                flushed = self.buffer.process_pending()
            except BaseException as exc:  # the thread must outlive any error
                # A backend outage, or SystemExit/KeyboardInterrupt raised by the flush callback
                # (its batch is kept for redelivery), must not end background flushing for
                # good: log, back off, try again.
                self.errors += 1
                self.last_error = exc
                log.error(
                    "process_pending() failed; retrying in %.3fs",
                    self.interval,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                flushed = 0
            if flushed == 0 and not self._stopping:
                self._wake.wait(self.interval)

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread after the batch in hand, then drain the buffer; idempotent.

        :param drain: call ``buffer.drain()`` once the thread stopped.
        :param timeout: seconds to wait for the thread; ``None`` waits as long as it takes.
        """
        with self._lock:
            thread = self._thread
            self._stopping = True
            self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("flusher thread still busy after %.3fs", timeout)
                return
        with self._lock:
            self._thread = None
            _running.discard(self)
        if drain:
            self.buffer.drain()

    def _after_fork(self, *, restart: bool) -> None:
        """In a forked child: fresh locks, no inherited thread; *restart* the loop if it ran.

        Guarded by the pid, so the owner of a flusher and the module hook may both call it.
        """
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        was_running = self._thread is not None and not self._stopping
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self.errors = 0
        self.last_error = None
        if was_running and restart:
            self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
