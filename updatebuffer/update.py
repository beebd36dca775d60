"""The values a buffer hands to the host: :class:`Update`, :class:`Batch`, :class:`BufferStats`."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, overload

if TYPE_CHECKING:
    from updatebuffer._types import Number, Value

__all__ = [
    "Batch",
    "BufferStats",
    "FlushCallback",
    "Update",
    "as_instants",
    "batch_lineage",
    "child_batch_id",
    "merge_updates",
]

#: The suffixes :func:`child_batch_id` appends; a split halves a batch, so there are two.
_SPLIT_SUFFIXES = (".0", ".1")


def child_batch_id(parent_id: str, index: int) -> str:
    """Return the id of half *index* (0 or 1) of batch *parent_id* when it is split.

    A batch that keeps failing is split to isolate the failing rows. Its halves are new batches
    whose ids are the parent's id plus ``.0`` or ``.1``, so a host's ledger can still tell that
    their rows may already have been applied under the parent's id (see :func:`batch_lineage`).
    Every backend, built-in or third-party, names split batches this way, and no other batch id
    ends in ``.0`` or ``.1``.

    :param parent_id: the id of the batch being split.
    :param index: 0 for the first half, 1 for the second.
    :raises ValueError: *index* is not 0 or 1.
    """
    if index not in (0, 1):
        raise ValueError(f"a split has two halves, 0 and 1; got index {index!r}")
    return f"{parent_id}{_SPLIT_SUFFIXES[index]}"


def batch_lineage(batch_id: str) -> tuple[str, ...]:
    """Return *batch_id* followed by the ids of the batches it was split from, nearest first.

    ``batch_lineage("f3a9.1.0") == ("f3a9.1.0", "f3a9.1", "f3a9")``. A host that records batch ids
    to apply each batch once (a ledger) must treat a batch as applied when *any* id of its lineage
    is recorded: a batch whose commit succeeded but was reported as failed (an error after the
    commit, a lost COMMIT reply) may later be split, and its halves carry rows already applied.

    :param batch_id: a batch's :attr:`Batch.id`.
    """
    lineage = [batch_id]
    while batch_id.endswith(_SPLIT_SUFFIXES) and len(batch_id) > 2:
        batch_id = batch_id[:-2]
        lineage.append(batch_id)
    return tuple(lineage)


def _empty() -> Mapping[str, Value]:
    return {}


def _empty_numbers() -> Mapping[str, Number]:
    return {}


@dataclass(frozen=True)
class Update:
    """The merged pending state of one row.

    :param model: the model (table) name.
    :param filters: column name to value, identifying the row.
    :param columns: column name to summed numeric delta (``col = col + delta``).
    :param extra: column name to the value of the latest ``incr`` (``col = value``).
    :param greatest: column name to the largest value seen (``col = max(col, value)``).
    :param least: column name to the smallest value seen (``col = min(col, value)``).
    :param signal_only: true only if every merged ``incr`` was a signal-only update.
    :param count: how many ``incr`` calls were merged into this update.
    :param first_buffered: epoch seconds of the oldest merged ``incr``.
    """

    model: str
    filters: Mapping[str, Value]
    columns: Mapping[str, Number] = field(default_factory=_empty_numbers)
    extra: Mapping[str, Value] = field(default_factory=_empty)
    greatest: Mapping[str, Value] = field(default_factory=_empty)
    least: Mapping[str, Value] = field(default_factory=_empty)
    signal_only: bool = False
    count: int = 1
    first_buffered: float = 0.0


_new_object = object.__new__


def _unchecked_update(
    model: str,
    filters: Mapping[str, Value],
    columns: Mapping[str, Number],
    extra: Mapping[str, Value],
    greatest: Mapping[str, Value],
    least: Mapping[str, Value],
    signal_only: bool,
    count: int,
    first_buffered: float,
) -> Update:
    """Build an :class:`Update` field by field, for backends decoding many stored rows.

    Equal to ``Update(...)`` with the same arguments, but without the frozen dataclass's nine
    ``object.__setattr__`` calls: about 1 us per row, a twentieth of a Redis drain's per-row
    cost. Every field must be given; tests check the names against ``dataclasses.fields``.
    """
    update: Update = _new_object(Update)
    state = update.__dict__
    state["model"] = model
    state["filters"] = filters
    state["columns"] = columns
    state["extra"] = extra
    state["greatest"] = greatest
    state["least"] = least
    state["signal_only"] = signal_only
    state["count"] = count
    state["first_buffered"] = first_buffered
    return update


def _pick(
    a: Mapping[str, Value],
    b: Mapping[str, Value],
    keep_b: Callable[[Value, Value], bool],
    strict: bool,
) -> dict[str, Value]:
    out = dict(a)
    for name, value in b.items():
        if name not in out:
            out[name] = value
            continue
        try:
            if keep_b(out[name], value):
                out[name] = value
        except TypeError:
            if strict:
                raise
            out[name] = value
    return out


def as_instants(old: Value, new: Value) -> tuple[Value, Value]:
    """Return *old* and *new* in a form whose Python order is the order ``greatest`` means.

    Python compares two datetimes that share a ``tzinfo`` by wall clock, ignoring their UTC
    offsets: across a DST change (``ZoneInfo``, ``fold=1``) a later instant can compare lower.
    Such a pair is returned as naive UTC datetimes, so every backend compares instants, as Redis
    does; anything else is returned as it is.
    """
    if (
        type(old) is datetime.datetime
        and type(new) is datetime.datetime
        and old.tzinfo is new.tzinfo
        and old.tzinfo is not None
        and not isinstance(old.tzinfo, datetime.timezone)  # a fixed offset: wall clock is fine
    ):
        return _naive_utc(old), _naive_utc(new)
    return old, new


def _naive_utc(moment: datetime.datetime) -> datetime.datetime:
    offset = moment.utcoffset()
    naive = moment.replace(tzinfo=None, fold=0)
    return naive if offset is None else naive - offset


def _greater(old: Value, new: Value) -> bool:
    old, new = as_instants(old, new)
    return new > old  # type: ignore[operator]  # callers only merge values of one ordered family


def _less(old: Value, new: Value) -> bool:
    old, new = as_instants(old, new)
    return new < old  # type: ignore[operator]  # callers only merge values of one ordered family


def merge_updates(earlier: Update, later: Update, *, strict: bool = True) -> Update:
    """Merge two updates of the same row; *later* is the one buffered after *earlier*.

    Sums ``columns``, lets *later* win for ``extra``, keeps the max for ``greatest`` and the min
    for ``least``, and ANDs ``signal_only``. ``count`` adds up; ``first_buffered`` is the minimum.

    :param strict: whether a ``greatest``/``least`` value that cannot be compared with the
        earlier one (a str after an int) raises; if false, *later*'s value is kept. A row's
        in-flight and pending parts are delivered in separate batches, so ``get()`` shows their
        merge without refusing what ``incr`` accepted.
    :raises TypeError: *strict* and two values cannot be compared.
    """
    columns: dict[str, Number] = dict(earlier.columns)
    for name, delta in later.columns.items():
        held = columns.get(name)
        # Not `get(name, 0) + delta`: 0 + -0.0 is 0.0, and a sum must keep the sign of zero.
        columns[name] = delta if held is None else held + delta
    return Update(
        model=earlier.model,
        filters=earlier.filters,
        columns=columns,
        extra={**earlier.extra, **later.extra},
        greatest=_pick(earlier.greatest, later.greatest, _greater, strict),
        least=_pick(earlier.least, later.least, _less, strict),
        signal_only=earlier.signal_only and later.signal_only,
        count=earlier.count + later.count,
        first_buffered=min(earlier.first_buffered, later.first_buffered),
    )


class Batch(Sequence[Update]):
    """The pending rows handed to the flush callback in one call.

    A batch that is delivered again (after a callback error or a crashed worker) keeps its
    :attr:`id` and gets ``attempt + 1``. A host that records ``id`` in the same transaction as its
    writes applies each batch effectively once. A batch never holds two updates of the same row.

    A batch split to isolate failing rows becomes two batches with derived ids
    (:func:`child_batch_id`); :attr:`lineage` lists the ids a ledger must check.

    :param updates: the rows.
    :param id: stable batch identifier.
    :param attempt: delivery attempt, 1 on first delivery.
    """

    __slots__ = ("_updates", "attempt", "id")

    # `id` shadows the builtin because the public contract names the attribute `id`.
    def __init__(self, updates: Sequence[Update], *, id: str, attempt: int = 1) -> None:
        self._updates = tuple(updates)
        self.id = id
        self.attempt = attempt

    @overload
    def __getitem__(self, index: int) -> Update: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Update]: ...
    def __getitem__(self, index: int | slice) -> Update | Sequence[Update]:
        return self._updates[index]

    def __len__(self) -> int:
        return len(self._updates)

    @property
    def lineage(self) -> tuple[str, ...]:
        """The batch's id, then the ids of the batches it was split from (:func:`batch_lineage`).

        A ledger that skips a batch whose lineage holds a recorded id applies its rows once,
        even when a batch that committed is reported as failed and then split.
        """
        return batch_lineage(self.id)

    def __iter__(self) -> Iterator[Update]:
        return iter(self._updates)

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r}, attempt={self.attempt}, rows={len(self._updates)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.id, self.attempt, self._updates) == (other.id, other.attempt, other._updates)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container; equality is by value


#: The host's flush function: write the batch, return on success, raise to have it redelivered.
FlushCallback: TypeAlias = Callable[[Batch], None]


@dataclass(frozen=True)
class BufferStats:
    """A snapshot of a buffer's state and lifetime totals.

    :param pending_rows: rows buffered and not yet claimed by a flush.
    :param oldest_pending_age: seconds since the oldest pending row's first update, or ``None``.
    :param in_flight_batches: batches claimed and not yet acknowledged (including those waiting
        for a retry).
    :param in_flight_rows: rows in those batches.
    :param dead_letters: rows currently in the dead-letter store.
    :param updates_accepted: ``incr`` calls accepted since the buffer was created.
    :param rows_flushed: rows whose flush callback returned.
    :param callback_failures: flush callback calls that raised.
    :param retries: batch deliveries with ``attempt > 1``.
    :param dead_lettered: rows moved to the dead-letter store since creation.
    :param pending_by_partition: pending rows per node/partition, for backends that partition.
    """

    pending_rows: int
    oldest_pending_age: float | None
    in_flight_batches: int
    in_flight_rows: int
    dead_letters: int
    updates_accepted: int
    rows_flushed: int
    callback_failures: int
    retries: int
    dead_lettered: int
    pending_by_partition: Mapping[str, int] = field(default_factory=dict)
