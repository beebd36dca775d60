"""In-process buffer: a thread-safe dict of pending rows.

Fast and dependency-free, but the pending rows live in this process: they are lost if it dies
before a flush (``kill -9``, OOM, power loss). ``close()`` and :class:`~updatebuffer.Flusher`
drain them on an orderly shutdown. Use the Redis backend when losing the last ``delay`` seconds
of counts on a crash is not acceptable, or when several processes must share one buffer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from typing_extensions import Self

from updatebuffer._retry import DeadLetter, backoff_delay, split_batch
from updatebuffer._validate import (
    _FAST_TAGS,
    INT64_MAX,
    INT64_MIN,
    Operations,
    check_one_operation,
    check_operations,
    check_sum,
    conflicting_operations,
    ordered_pick,
    plain_filters,
    require_filters,
    row_identity,
)
from updatebuffer.buffer import _Closeable
from updatebuffer.config import (
    Option,
    boolean,
    choice,
    count,
    duration,
    mask_url,
    parse_options,
)
from updatebuffer.errors import (
    BufferFullError,
    ConfigurationError,
    InvalidUpdateError,
    UpdateBufferError,
)
from updatebuffer.keys import check_name
from updatebuffer.update import (
    Batch,
    BufferStats,
    FlushCallback,
    Update,
    _unchecked_update,
    merge_updates,
)

if TYPE_CHECKING:
    from collections.abc import Hashable, Mapping

    from updatebuffer._types import Number, Value

__all__ = ["MemoryBuffer"]

log = logging.getLogger(__name__)

_OVERFLOW = ("flush", "block", "raise")
_FIRST_CLOSE_PAUSE = 0.01


class _Row:
    """Mutable merged state of one pending row (only touched under the buffer's lock)."""

    __slots__ = (
        "columns",
        "count",
        "extra",
        "filters",
        "first_buffered",
        "greatest",
        "least",
        "model",
        "signal_only",
    )

    def __init__(
        self,
        model: str,
        filters: dict[str, Value],
        columns: dict[str, Number],
        extra: dict[str, Value],
        greatest: dict[str, Value],
        least: dict[str, Value],
        signal_only: bool,
        first_buffered: float,
    ) -> None:
        self.model = model
        self.filters = filters
        self.columns = columns
        self.extra = extra
        self.greatest = greatest
        self.least = least
        self.signal_only = signal_only
        self.count = 1
        self.first_buffered = first_buffered

    def freeze(self) -> Update:
        return Update(
            model=self.model,
            filters=dict(self.filters),
            columns=dict(self.columns),
            extra=dict(self.extra),
            greatest=dict(self.greatest),
            least=dict(self.least),
            signal_only=self.signal_only,
            count=self.count,
            first_buffered=self.first_buffered,
        )


class _Flight:
    """A claimed batch: delivered, awaiting retry, or being delivered by some thread."""

    __slots__ = ("attempt", "id", "keys", "not_before", "owner", "running", "updates")

    def __init__(
        self, batch_id: str, keys: tuple[Hashable, ...], updates: tuple[Update, ...]
    ) -> None:
        self.id = batch_id
        self.keys = keys
        self.updates = updates
        self.attempt = 1
        self.not_before = 0.0
        self.running = True
        #: The thread delivering it while ``running``.
        self.owner = threading.get_ident()


_instances: weakref.WeakSet[MemoryBuffer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for buffer in list(_instances):
        buffer._reset_after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class MemoryBuffer(_Closeable):
    """Buffer pending rows in this process's memory.

    URL forms: ``memory://`` with options in the query, e.g. ``memory://?delay=1&batch_size=200``.

    Example configuration::

        buf = updatebuffer.from_url("memory://?delay=2", flush=write_rows)
        buf = MemoryBuffer(flush=write_rows, delay=2.0, max_rows=50_000, overflow="block")

    :param flush: the host's flush callback.
    :param delay: seconds from a row's first buffered update until it is flushed (default 0).
    :param batch_size: rows per flush callback call (default 500).
    :param max_rows: most pending rows held; see *overflow* (default 100,000).
    :param overflow: when *max_rows* are pending and a new row arrives: ``"flush"`` (the calling
        thread flushes the oldest batch inline, default), ``"block"`` (wait up to
        *block_timeout* for a flusher to make room) or ``"raise"`` (:class:`BufferFullError`).
    :param block_timeout: seconds ``"block"`` waits before raising :class:`BufferFullError`.
    :param max_attempts: deliveries of a failing batch before it is split to isolate failing rows;
        a row failing alone this often is dead-lettered (default 5).
    :param retry_backoff: seconds before the first redelivery; doubles per attempt, jittered.
    :param retry_backoff_max: cap of the redelivery backoff.
    :param drain_on_close: whether :meth:`close` drains pending rows (default true).
    :param close_timeout: seconds :meth:`close` keeps redelivering and splitting failed batches
        (ignoring their backoff) so that every healthy row is delivered and only rows failing
        alone are left, as dead letters (default 5).
    """

    #: Typed options accepted in the URL query or as keywords.
    OPTIONS: ClassVar[Mapping[str, Option]] = {
        "delay": duration(0.0),
        "batch_size": count(500),
        "max_rows": count(100_000),
        "overflow": choice("flush", *_OVERFLOW),
        "block_timeout": duration(10.0),
        "max_attempts": count(5),
        "retry_backoff": duration(0.5),
        "retry_backoff_max": duration(60.0),
        "drain_on_close": boolean(True),
        "close_timeout": duration(5.0),
    }

    def __init__(
        self,
        *,
        flush: FlushCallback,
        delay: float = 0.0,
        batch_size: int = 500,
        max_rows: int = 100_000,
        overflow: str = "flush",
        block_timeout: float = 10.0,
        max_attempts: int = 5,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 60.0,
        drain_on_close: bool = True,
        close_timeout: float = 5.0,
    ) -> None:
        if not callable(flush):
            raise ConfigurationError(f"flush must be callable, got {type(flush).__qualname__}")
        checked = parse_options(
            "memory",
            self.OPTIONS,
            "",
            {
                "delay": delay,
                "batch_size": batch_size,
                "max_rows": max_rows,
                "overflow": overflow,
                "block_timeout": block_timeout,
                "max_attempts": max_attempts,
                "retry_backoff": retry_backoff,
                "retry_backoff_max": retry_backoff_max,
                "drain_on_close": drain_on_close,
                "close_timeout": close_timeout,
            },
        )
        self._flush = flush
        self.delay: float = checked["delay"]
        self.batch_size: int = checked["batch_size"]
        self.max_rows: int = checked["max_rows"]
        self.overflow: str = checked["overflow"]
        self.block_timeout: float = checked["block_timeout"]
        self.max_attempts: int = checked["max_attempts"]
        self.retry_backoff: float = checked["retry_backoff"]
        self.retry_backoff_max: float = checked["retry_backoff_max"]
        self.drain_on_close: bool = checked["drain_on_close"]
        self.close_timeout: float = checked["close_timeout"]
        self._init_state()
        _instances.add(self)

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        # Insertion order is first-buffered order: a claimed row that gets new updates starts a
        # new entry at the end, so scanning from the front claims the oldest rows first.
        self._pending: dict[Hashable, _Row] = {}
        self._flights: dict[str, _Flight] = {}
        self._busy: dict[Hashable, str] = {}
        self._dead: list[DeadLetter] = []
        self._closed = False
        # Set once close() ran to its end; a close() interrupted (KeyboardInterrupt from the
        # callback) can be called again and goes on delivering.
        self._close_done = False
        # Updates accepted that are no longer in a pending row; stats() adds the pending rows'
        # counts, which keeps a counter update off the incr fast path.
        self._accepted = 0
        self._flushed = 0
        self._failures = 0
        self._retries = 0
        self._dead_total = 0

    def _reset_after_fork(self) -> None:
        # The parent owns (and will flush) everything buffered before fork(); a child that kept
        # a copy would flush it a second time. The lock may have been held at fork: replace it.
        self._init_state()

    @classmethod
    def from_url(cls, url: str, *, flush: FlushCallback, **options: Any) -> Self:
        """Build a memory buffer from ``memory://?option=value`` and keyword options.

        :raises ConfigurationError: the URL has a host or path, or an option is invalid.
        """
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError(
                f"memory backend URLs start with 'memory://', got {mask_url(url)!r}"
            )
        if parts.netloc or parts.path.strip("/"):
            raise ConfigurationError(
                f"memory backend URLs take no host or path, got {mask_url(url)!r}; "
                "use 'memory://?delay=1'"
            )
        return cls(flush=flush, **parse_options("memory", cls.OPTIONS, url, options))

    def __repr__(self) -> str:
        return (
            f"MemoryBuffer(delay={self.delay}, batch_size={self.batch_size}, "
            f"max_rows={self.max_rows}, overflow={self.overflow!r})"
        )

    # -- writing ---------------------------------------------------------------------------

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
        """Buffer one update of the row ``(model, filters)`` (see :meth:`Buffer.incr`).

        :raises InvalidUpdateError: invalid name, type or value, or an integer sum leaving signed
            64-bit; nothing is stored.
        :raises BufferFullError: *max_rows* are pending and *overflow* is ``"raise"`` (or
            ``"block"`` timed out).
        :raises UpdateBufferError: the buffer is closed.
        """
        # Fast path for the hot shape -- one int delta, one filter of a common type, nothing
        # else -- merging into a row that is already pending. It performs the same checks as the
        # general path below, just without building intermediate dicts.
        if (
            extra is None
            and greatest is None
            and least is None
            and type(columns) is dict
            and type(filters) is dict
            and len(columns) == 1
            and len(filters) == 1
            and type(model) is str
            and model
        ):
            # `k, = d` then `d[k]` is measurably cheaper than unpacking `d.items()`.
            (column,) = columns
            delta = columns[column]
            (name,) = filters
            value = filters[name]
            tag = _FAST_TAGS.get(type(value))
            if (
                tag is not None
                and type(delta) is int
                and INT64_MIN <= delta <= INT64_MAX
                and type(column) is str
                and column
                and type(name) is str
                and name
                and (signal_only is False or signal_only is True)
            ):
                with self._lock:
                    row = self._pending.get((model, (name, tag, value)))
                    if row is not None and not self._closed:
                        held = row.columns
                        old = held.get(column)
                        # A column new to the row takes the general path, which checks its name
                        # and that the row has no other operation on it. A float + an int64
                        # delta cannot leave the finite range, so only an int sum is checked.
                        if old is not None and (
                            type(total := old + delta) is not int or INT64_MIN <= total <= INT64_MAX
                        ):
                            held[column] = total
                            row.count += 1
                            if not signal_only and row.signal_only:
                                row.signal_only = False
                            return
        self._incr(model, columns, filters, extra, greatest, least, signal_only)

    def _incr(
        self,
        model: str,
        columns: Mapping[str, Number] | None,
        filters: Mapping[str, Value] | None,
        extra: Mapping[str, Value] | None,
        greatest: Mapping[str, Value] | None,
        least: Mapping[str, Value] | None,
        signal_only: bool,
    ) -> None:
        if not filters:
            require_filters(filters)
        key = row_identity(model, filters)
        # One operation per column: checked below, only for a new row or for names new to a
        # pending row (a merge into a row that already has every name needs no check).
        ops = check_operations(columns, extra, greatest, least, signal_only, distinct=False)
        cols, ext, most, fewest, signal_only = ops
        deadline: float | None = None
        while True:
            with self._lock:
                if self._closed:
                    raise UpdateBufferError("incr() on a closed buffer")
                row = self._pending.get(key)
                if row is not None:
                    _merge_into(row, cols, ext, most, fewest, signal_only)
                    return
                if deadline is None:
                    if ext or most or fewest:
                        check_one_operation(ops, filters)
                    else:  # inline for the common shape, a new row of sums only
                        for name in filters:  # type: ignore[union-attr]  # checked by row_identity
                            if name in cols:
                                raise conflicting_operations(name, "filters", "columns")
                if len(self._pending) < self.max_rows:
                    self._pending[key] = _Row(
                        model if type(model) is str else check_name(model, "model"),
                        plain_filters(filters),  # type: ignore[arg-type]  # checked by row_identity
                        cols,
                        ext,
                        most,
                        fewest,
                        signal_only,
                        time.time(),
                    )
                    return
                if self.overflow == "raise":
                    raise BufferFullError(
                        f"memory buffer holds max_rows={self.max_rows} pending rows; "
                        "flush more often, raise max_rows, or use overflow='flush'"
                    )
                flight = self._claim_rows(float("inf")) if self.overflow == "flush" else None
                # "block", or "flush" with every pending row waiting on a live batch: wait.
                if flight is None:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.block_timeout
                    if now >= deadline or not self._room.wait(deadline - now):
                        raise BufferFullError(
                            f"memory buffer stayed full (max_rows={self.max_rows}) for "
                            f"block_timeout={self.block_timeout}s; is a Flusher running?"
                        )
                    continue
            # overflow == "flush": deliver the oldest rows from this thread, then try again.
            self._deliver(flight)

    # -- flushing --------------------------------------------------------------------------

    def process_pending(self, *, max_batches: int | None = None) -> int:
        """Flush rows whose delay has elapsed and failed batches whose backoff has elapsed.

        Rows first buffered after this call started wait for the next call, so a steady stream
        of updates cannot keep it busy forever.

        :param max_batches: deliver at most this many batches (a worker that must stop soon
            calls it with 1); ``None`` delivers everything due.
        :return: rows whose flush callback returned.
        """
        return self._run(drain=False, max_batches=max_batches)

    def drain(self) -> int:
        """Flush every pending row and retry every failed batch once, ignoring delay and backoff.

        A batch another thread (a :class:`~updatebuffer.Flusher`) is delivering meanwhile is
        waited for, and retried here if that delivery fails, so no failed batch is left waiting
        out its backoff when this returns.

        :return: rows whose flush callback returned.
        """
        return self._run(drain=True)

    def _run(self, *, drain: bool, max_batches: int | None = None) -> int:
        start = time.time()
        cutoff = start if drain else start - self.delay
        tried: set[str] = set()
        flushed = 0
        while max_batches is None or len(tried) < max_batches:
            with self._lock:
                while True:
                    flight = self._claim_retry(time.time(), drain, tried)
                    if flight is None:
                        flight = self._claim_rows(cutoff)
                    if flight is not None or not drain or not self._delivered_elsewhere(tried):
                        break
                    # Another thread (a Flusher) is delivering a batch right now. If it fails,
                    # drain() must retry it now, not leave it to its backoff; if it succeeds,
                    # newer data of its rows becomes claimable. Either way it notifies _room.
                    self._room.wait()
            if flight is None:
                return flushed
            tried.add(flight.id)
            flushed += self._deliver(flight)
        return flushed

    def _delivered_elsewhere(self, tried: set[str]) -> bool:
        me = threading.get_ident()
        return any(
            f.running and f.owner != me and f.id not in tried for f in self._flights.values()
        )

    def _claim_retry(self, now: float, drain: bool, tried: set[str]) -> _Flight | None:
        chosen: _Flight | None = None
        for flight in self._flights.values():
            if flight.running or flight.id in tried:
                continue
            if (drain or flight.not_before <= now) and (
                chosen is None or flight.not_before < chosen.not_before
            ):
                chosen = flight
        if chosen is not None:
            chosen.running = True
            chosen.owner = threading.get_ident()
        return chosen

    def _claim_rows(self, cutoff: float) -> _Flight | None:
        keys: list[Hashable] = []
        for key, row in self._pending.items():
            if row.first_buffered > cutoff:
                break
            # A row whose earlier data is still in a live batch waits: delivering both at once
            # could apply an older `extra` after a newer one.
            if key in self._busy:
                continue
            keys.append(key)
            if len(keys) >= self.batch_size:
                break
        if not keys:
            return None
        flight = _Flight(
            uuid.uuid4().hex, tuple(keys), tuple(self._pending.pop(k).freeze() for k in keys)
        )
        self._accepted += sum(u.count for u in flight.updates)
        for key in keys:
            self._busy[key] = flight.id
        self._flights[flight.id] = flight
        self._room.notify_all()
        return flight

    def _deliver(self, flight: _Flight) -> int:
        batch = Batch(tuple(map(_copy, flight.updates)), id=flight.id, attempt=flight.attempt)
        try:
            self._flush(batch)
        except BaseException as exc:
            log.warning(
                "flush callback failed for batch %s (attempt %d, %d rows); keeping it for retry",
                batch.id,
                batch.attempt,
                len(batch),
                exc_info=True,
            )
            with self._lock:
                self._failed(flight, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt/SystemExit: the batch is kept, the signal goes on.
            return 0
        with self._lock:
            self._flights.pop(flight.id, None)
            for key in flight.keys:
                if self._busy.get(key) == flight.id:
                    del self._busy[key]
            # Its rows' newer data may be claimed now: an incr waiting for room can flush it.
            self._room.notify_all()
            self._flushed += len(flight.updates)
            if flight.attempt > 1:
                self._retries += 1
        return len(flight.updates)

    def _failed(self, flight: _Flight, exc: BaseException) -> None:
        self._failures += 1
        if flight.attempt > 1:
            self._retries += 1
        now = time.time()
        if flight.attempt < self.max_attempts:
            flight.attempt += 1
            flight.not_before = now + backoff_delay(
                flight.attempt, self.retry_backoff, self.retry_backoff_max
            )
            flight.running = False
            # A drain() waiting for this delivery retries it now.
            self._room.notify_all()
            return
        del self._flights[flight.id]
        # Dead-lettered or split, the batch is finished: wake an incr waiting for room.
        self._room.notify_all()
        if len(flight.updates) == 1:
            key = flight.keys[0]
            if self._busy.get(key) == flight.id:
                del self._busy[key]
            self._dead.append(
                DeadLetter(flight.updates[0], flight.id, flight.attempt, repr(exc), now)
            )
            self._dead_total += 1
            log.error(
                "row %s %r dead-lettered after %d failed deliveries of batch %s: %r",
                flight.updates[0].model,
                flight.updates[0].filters,
                flight.attempt,
                flight.id,
                exc,
            )
            return
        pairs = list(zip(flight.keys, flight.updates, strict=True))
        for child_id, part in split_batch(flight.id, pairs):
            child = _Flight(child_id, tuple(k for k, _ in part), tuple(u for _, u in part))
            child.running = False  # eligible at once: isolating the failing rows is the point
            self._flights[child_id] = child
            for key in child.keys:
                self._busy[key] = child_id

    # -- reading ---------------------------------------------------------------------------

    def get(self, model: str, filters: Mapping[str, Value]) -> Update | None:
        """Return the not yet flushed update of a row (pending and in-flight parts merged).

        :raises InvalidUpdateError: the model or filters are invalid.
        """
        key = row_identity(model, filters)
        with self._lock:
            parts: list[Update] = []
            flight_id = self._busy.get(key)
            if flight_id is not None and flight_id in self._flights:
                flight = self._flights[flight_id]
                parts.append(_copy(flight.updates[flight.keys.index(key)]))
            row = self._pending.get(key)
            if row is not None:
                parts.append(row.freeze())
        if not parts:
            return None
        merged = parts[0]
        for later in parts[1:]:
            merged = merge_updates(merged, later, strict=False)
        return merged

    def stats(self) -> BufferStats:
        """Return a snapshot of pending, in-flight and dead-lettered rows and lifetime totals."""
        with self._lock:
            oldest = next(iter(self._pending.values()), None)
            return BufferStats(
                pending_rows=len(self._pending),
                oldest_pending_age=None if oldest is None else time.time() - oldest.first_buffered,
                in_flight_batches=len(self._flights),
                in_flight_rows=sum(len(f.updates) for f in self._flights.values()),
                dead_letters=len(self._dead),
                updates_accepted=self._accepted + sum(r.count for r in self._pending.values()),
                rows_flushed=self._flushed,
                callback_failures=self._failures,
                retries=self._retries,
                dead_lettered=self._dead_total,
            )

    # -- dead letters ----------------------------------------------------------------------

    def dead_letters(self) -> list[DeadLetter]:
        """Return the rows that failed alone ``max_attempts`` times, oldest first."""
        with self._lock:
            return [dataclasses.replace(d, update=_copy(d.update)) for d in self._dead]

    def replay_dead_letters(self) -> int:
        """Put every dead-lettered row back into the pending rows; return how many.

        A replayed row merges *before* any newer pending data of the same row, so a newer
        ``extra`` still wins.
        """
        with self._lock:
            dead, self._dead = self._dead, []
            kept: list[DeadLetter] = []
            # Newest first: each letter merges *before* what is pending, so replaying two letters
            # of one row oldest first would let the older one's `extra` win.
            for letter in reversed(dead):
                update = letter.update
                key = row_identity(update.model, update.filters)
                newer = self._pending.get(key)
                try:
                    merged = update if newer is None else _replay_merge(update, newer.freeze())
                except InvalidUpdateError as exc:
                    # As the Redis backend does: the letter stays dead, with the reason.
                    kept.append(dataclasses.replace(letter, error=f"replay refused: {exc}"))
                    log.error("dead letter %s cannot be replayed: %s", letter.batch_id, exc)
                    continue
                self._pending.pop(key, None)
                self._pending[key] = _row_from_update(merged)
                # Its updates were counted when it left the pending rows; they are pending again.
                self._accepted -= update.count
            self._dead = kept[::-1] + self._dead
            return len(dead) - len(kept)

    def purge_dead_letters(self) -> int:
        """Delete every dead-lettered row; return how many were deleted."""
        with self._lock:
            purged = len(self._dead)
            self._dead = []
            return purged

    # -- lifecycle -------------------------------------------------------------------------

    def _drain_for_close(self) -> None:
        deadline = time.monotonic() + self.close_timeout
        pause = _FIRST_CLOSE_PAUSE
        before: set[str] = set()
        while True:
            flushed = self.drain()
            with self._lock:
                # A batch another thread is delivering finishes there; waiting for it is that
                # thread's (or its Flusher.stop()'s) business.
                failed = {f.id for f in self._flights.values() if not f.running}
                waiting = bool(self._pending) or bool(failed)
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                return
            # Each round is one more attempt of every failed batch, so splitting goes on without
            # a pause while it makes progress; a callback failing for every row (its database
            # is down) is not hammered in between.
            if flushed or failed != before:
                pause = _FIRST_CLOSE_PAUSE
            else:
                pause = _close_pause(pause, remaining)
            before = failed

    def close(self) -> None:
        """Stop accepting updates and, if *drain_on_close*, deliver what is left; idempotent.

        For up to *close_timeout* seconds failed batches are redelivered without backoff and
        split, so every row that can be delivered is, and a row failing alone ends as a dead
        letter, still readable through :meth:`dead_letters` after close. Rows left in flight
        when the time is up (the callback keeps failing) are logged as an error: they are lost
        when the process exits.
        """
        with self._lock:
            if self._close_done:
                return
            self._closed = True
            self._room.notify_all()
        if self.drain_on_close:
            self._drain_for_close()
        with self._lock:
            self._close_done = True
        left = self.stats()
        if left.pending_rows or left.in_flight_rows or left.dead_letters:
            log.error(
                "memory buffer closed with %d pending, %d in-flight and %d dead-lettered rows "
                "not flushed; they are lost when this process exits",
                left.pending_rows,
                left.in_flight_rows,
                left.dead_letters,
            )


def _copy(update: Update) -> Update:
    """Return a copy of a held *update* whose mappings the host may change.

    A callback may reuse what it is handed (``u.columns.update(u.extra)``, ``u.filters["id"] =
    ...``); a redelivery, ``get()`` or a dead letter must still hold what was buffered, as the
    Redis backend, which reads rows back from Redis each time, gives.
    """
    return _unchecked_update(
        update.model,
        dict(update.filters),
        dict(update.columns),
        dict(update.extra),
        dict(update.greatest),
        dict(update.least),
        update.signal_only,
        update.count,
        update.first_buffered,
    )


def _close_pause(pause: float, remaining: float) -> float:
    """Sleep before the next close round (bounded by what is left); return the next pause."""
    time.sleep(max(0.0, min(pause, remaining)))
    return min(pause * 2, 0.5)


def _merge_into(
    row: _Row,
    cols: dict[str, Number],
    ext: dict[str, Value],
    most: dict[str, Value],
    fewest: dict[str, Value],
    signal_only: bool,
) -> None:
    # Compute every change first and apply them after: a rejected update leaves the row as is.
    sums: list[tuple[str, Number]] = []
    current = row.columns
    for name, delta in cols.items():
        old = current.get(name)
        if old is None:
            total = delta
            _check_unclaimed(name, "columns", row, cols, ext, most, fewest)
        else:
            # Python's own left-to-right sum: int + float is float(int) + float, the reference
            # every backend reproduces to the bit.
            total = old + delta
            if (
                total > INT64_MAX or total < INT64_MIN
                if type(total) is int
                else not math.isfinite(total)
            ):
                check_sum(name, total)
        sums.append((name, total))
    held_extra = row.extra
    for name in ext:
        if name not in held_extra:
            _check_unclaimed(name, "extra", row, cols, ext, most, fewest)
    picks: list[tuple[dict[str, Value], str, Value]] = []
    for what, incoming, held, greater in (
        ("greatest", most, row.greatest, True),
        ("least", fewest, row.least, False),
    ):
        for name, value in incoming.items():
            if name not in held:
                _check_unclaimed(name, what, row, cols, ext, most, fewest)
                picks.append((held, name, value))
            elif ordered_pick(what, name, held[name], value, greater):
                picks.append((held, name, value))
    for name, total in sums:
        current[name] = total
    for held, name, value in picks:
        held[name] = value
    if ext:
        row.extra.update(ext)
    if not signal_only:
        row.signal_only = False
    row.count += 1


def _check_unclaimed(
    name: str,
    what: str,
    row: _Row,
    cols: dict[str, Number],
    ext: dict[str, Value],
    most: dict[str, Value],
    fewest: dict[str, Value],
) -> None:
    # One operation per column per row: a column summed by one incr and set by `extra` (or
    # ordered) by another has no single meaning for the host's row. Called for names new to
    # the row only; a clash within this update is named in check_operations' order first.
    named: tuple[tuple[str, Mapping[str, object], Mapping[str, object]], ...] = (
        ("columns", row.columns, cols),
        ("extra", row.extra, ext),
        ("greatest", row.greatest, most),
        ("least", row.least, fewest),
    )
    incoming = [other for other, _, new in named if other != what and name in new]
    if incoming:
        first, second = sorted((incoming[0], what), key=_OPERATION_ORDER.index)
        raise conflicting_operations(name, first, second)
    if name in row.filters:
        raise conflicting_operations(name, "filters", what)
    for other, held, _ in named:
        if other != what and name in held:
            raise conflicting_operations(name, other, what)


_OPERATION_ORDER = ("filters", "columns", "extra", "greatest", "least")


def _replay_merge(letter: Update, newer: Update) -> Update:
    """Merge a dead letter before the pending data of its row, refusing what ``incr`` refuses.

    :raises InvalidUpdateError: a sum leaves the storable range, two values cannot be compared,
        or a column would take two operations.
    """
    try:
        merged = merge_updates(letter, newer)
    except TypeError as exc:
        raise InvalidUpdateError(
            f"greatest/least: cannot compare the letter's values with the pending ones ({exc})",
            field="greatest/least",
            expected="values of one ordered type per column",
            got="values of two types",
        ) from None
    for name, total in merged.columns.items():
        check_sum(name, total)
    check_one_operation(
        Operations(
            dict(merged.columns),
            dict(merged.extra),
            dict(merged.greatest),
            dict(merged.least),
            False,
        )
    )
    return merged


def _row_from_update(update: Update) -> _Row:
    row = _Row(
        update.model,
        dict(update.filters),
        dict(update.columns),
        dict(update.extra),
        dict(update.greatest),
        dict(update.least),
        update.signal_only,
        update.first_buffered,
    )
    row.count = update.count
    return row
