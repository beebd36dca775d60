"""Pass-through "buffer": every ``incr`` is written at once through the flush callback.

It buffers nothing, so it loses nothing and saves nothing: it exists for tests, development and
small apps, and is Sentry's base ``Buffer`` that writes synchronously.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from typing_extensions import Self

from updatebuffer._validate import (
    check_operations,
    plain_filters,
    require_filters,
    row_identity,
)
from updatebuffer.buffer import _Closeable
from updatebuffer.config import Option, mask_url, parse_options
from updatebuffer.errors import ConfigurationError, UpdateBufferError
from updatebuffer.keys import check_name
from updatebuffer.update import Batch, BufferStats, FlushCallback, Update

if TYPE_CHECKING:
    from collections.abc import Mapping

    from updatebuffer._types import Number, Value

__all__ = ["DirectBuffer"]


class DirectBuffer(_Closeable):
    """Call the flush callback inside ``incr`` with a one-row batch.

    A callback error propagates to the ``incr`` caller unchanged (the same exception object) and
    nothing is kept: the caller saw the failure, so it owns the retry.

    URL forms: ``direct://``.

    Example configuration::

        buf = updatebuffer.from_url("direct://", flush=write_rows)

    :param flush: the host's flush callback.
    """

    #: Typed options accepted in the URL query or as keywords (none).
    OPTIONS: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, *, flush: FlushCallback) -> None:
        if not callable(flush):
            raise ConfigurationError(f"flush must be callable, got {type(flush).__qualname__}")
        self._flush = flush
        self._lock = threading.Lock()
        self._closed = False
        self._accepted = 0
        self._flushed = 0
        self._failures = 0

    @classmethod
    def from_url(cls, url: str, *, flush: FlushCallback, **options: Any) -> Self:
        """Build a direct buffer from ``direct://``.

        :raises ConfigurationError: the URL has a host, path or any option.
        """
        parts = urlsplit(url)
        if parts.scheme != "direct" or parts.netloc or parts.path.strip("/"):
            raise ConfigurationError(
                f"direct backend URL must be 'direct://', got {mask_url(url)!r}"
            )
        parse_options("direct", cls.OPTIONS, url, options)
        return cls(flush=flush)

    def __repr__(self) -> str:
        return "DirectBuffer()"

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
        """Validate the update and flush it at once as a one-row batch.

        :raises InvalidUpdateError: invalid name, type or value; the callback is not called.
        :raises Exception: whatever the flush callback raised, unchanged.
        """
        if self._closed:
            raise UpdateBufferError("incr() on a closed buffer")
        if not filters:
            require_filters(filters)
        row_identity(model, filters)
        ops = check_operations(columns, extra, greatest, least, signal_only, filters)
        update = Update(
            model=model if type(model) is str else check_name(model, "model"),
            filters=plain_filters(filters),  # type: ignore[arg-type]  # checked by row_identity
            columns=ops.columns,
            extra=ops.extra,
            greatest=ops.greatest,
            least=ops.least,
            signal_only=ops.signal_only,
            count=1,
            first_buffered=time.time(),
        )
        with self._lock:
            self._accepted += 1
        try:
            self._flush(Batch([update], id=uuid.uuid4().hex, attempt=1))
        except BaseException:
            with self._lock:
                self._failures += 1
            raise
        with self._lock:
            self._flushed += 1

    def process_pending(self) -> int:
        """Return 0: nothing is ever pending."""
        return 0

    def drain(self) -> int:
        """Return 0: nothing is ever pending."""
        return 0

    def get(self, model: str, filters: Mapping[str, Value]) -> Update | None:
        """Return ``None``: nothing is ever pending.

        :raises InvalidUpdateError: the model or filters are invalid.
        """
        row_identity(model, filters)
        return None

    def stats(self) -> BufferStats:
        """Return the totals; nothing is ever pending or in flight."""
        with self._lock:
            return BufferStats(
                pending_rows=0,
                oldest_pending_age=None,
                in_flight_batches=0,
                in_flight_rows=0,
                dead_letters=0,
                updates_accepted=self._accepted,
                rows_flushed=self._flushed,
                callback_failures=self._failures,
                retries=0,
                dead_lettered=0,
            )

    def close(self) -> None:
        """Stop accepting updates; idempotent."""
        self._closed = True
