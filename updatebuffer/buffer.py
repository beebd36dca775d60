"""The :class:`Buffer` protocol every backend satisfies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from typing_extensions import Self

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from updatebuffer._retry import DeadLetter
    from updatebuffer._types import Number, Value
    from updatebuffer.update import BufferStats, Update

__all__ = ["Buffer", "DeadLetterStore"]


@runtime_checkable
class Buffer(Protocol):
    """Absorbs row updates and hands their merged result to a flush callback.

    See the semantics every backend honours in ``updatebuffer.testing.contract``.
    """

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
        """Buffer one update of the row ``(model, filters)``.

        :param model: the model (table) name.
        :param columns: numeric deltas, summed per column.
        :param filters: column values identifying the row.
        :param extra: values to set; the latest ``incr`` wins.
        :param greatest: values to keep the maximum of.
        :param least: values to keep the minimum of.
        :param signal_only: the update carries no data to write, only a signal; merged rows are
            signal-only when every merged update was.
        :raises InvalidUpdateError: a name, type or value is invalid; nothing is stored.
        """
        ...

    def process_pending(self) -> int:
        """Flush rows whose delay (and retry backoff) has elapsed; return the rows flushed."""
        ...

    def drain(self) -> int:
        """Flush everything now, ignoring delay and backoff; return the rows flushed."""
        ...

    def get(self, model: str, filters: Mapping[str, Value]) -> Update | None:
        """Return the pending (not yet flushed) update of a row, or ``None``."""
        ...

    def stats(self) -> BufferStats:
        """Return a snapshot of the buffer's state and totals."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class DeadLetterStore(Protocol):
    """A buffer that keeps rows failing alone ``max_attempts`` times (memory, Redis)."""

    def dead_letters(self) -> list[DeadLetter]:
        """Return the dead-lettered rows, oldest first."""
        ...

    def replay_dead_letters(self) -> int:
        """Put every dead letter back among the pending rows; return how many."""
        ...

    def purge_dead_letters(self) -> int:
        """Delete every dead letter; return how many."""
        ...


class _Closeable:
    """Mixin for the built-in backends: ``with buffer:`` closes the buffer on exit."""

    def close(self) -> None:
        """Release resources; idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
