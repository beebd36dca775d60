"""The shared contract suite: every backend's tests subclass :class:`BufferContract`.

A backend (built-in or third-party) runs the suite by providing one fixture::

    from updatebuffer.testing.contract import BufferContract

    class TestMyBuffer(BufferContract):
        @pytest.fixture
        def make_buffer(self):
            made = []

            def make(flush, **options):
                buf = MyBuffer(flush=flush, **options)
                made.append(buf)
                return buf

            yield make
            for buf in made:
                buf.close()

``make_buffer(flush, **options)`` must accept the options ``delay``, ``batch_size``,
``max_attempts``, ``retry_backoff`` (seconds) and ``drain_on_close``. A backend that cannot
honour part of the contract sets the matching class flag to ``False``; the tests it turns off
are skipped with a reason.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from updatebuffer._validate import row_identity
from updatebuffer.buffer import Buffer
from updatebuffer.errors import InvalidUpdateError, UpdateBufferError
from updatebuffer.flusher import Flusher
from updatebuffer.update import batch_lineage

if TYPE_CHECKING:
    from updatebuffer._types import Value
    from updatebuffer.update import Batch, Update

__all__ = ["BufferContract", "MakeBuffer", "Recorder"]

#: ``make_buffer(flush, **options) -> Buffer``.
MakeBuffer = Callable[..., Buffer]

_UTC = datetime.timezone.utc


class Recorder:
    """A flush callback that records every batch and can be told to fail.

    :param fail_times: raise on this many calls before succeeding.
    :param poison: rows (``(model, filters)``) whose presence in a batch makes the call fail.
    """

    def __init__(
        self,
        *,
        fail_times: int = 0,
        poison: tuple[tuple[str, dict[str, Value]], ...] = (),
    ) -> None:
        self.fail_times = fail_times
        self.poison = {row_identity(m, f) for m, f in poison}
        self.calls: list[Batch] = []
        self.applied: list[Batch] = []
        self._lock = threading.Lock()
        self._live: set[Hashable] = set()
        #: Rows seen in two live batches at the same time (must stay empty).
        self.overlaps: list[Hashable] = []

    def __call__(self, batch: Batch) -> None:
        """Record *batch*; raise if told to fail."""
        keys = [row_identity(u.model, u.filters) for u in batch]
        with self._lock:
            self.calls.append(batch)
            self.overlaps.extend(k for k in keys if k in self._live)
            self._live.update(keys)
        try:
            time.sleep(0)  # let other flushers interleave
            with self._lock:
                if self.fail_times > 0:
                    self.fail_times -= 1
                    raise RuntimeError(f"injected failure for batch {batch.id}")
                if self.poison.intersection(keys):
                    raise RuntimeError(f"poisoned row in batch {batch.id}")
                self.applied.append(batch)
        finally:
            with self._lock:
                self._live.difference_update(keys)

    def updates(self) -> list[Update]:
        """Every update of every batch the callback accepted."""
        with self._lock:
            return [u for batch in self.applied for u in batch]

    def total(self, column: str, model: str | None = None) -> int | float:
        """Sum of *column* over accepted updates (optionally of one model)."""
        return sum(
            u.columns.get(column, 0) for u in self.updates() if model is None or u.model == model
        )

    def per_row(self, column: str) -> Counter[Hashable]:
        """Sum of *column* per row over accepted updates."""
        sums: Counter[Hashable] = Counter()
        for u in self.updates():
            sums[row_identity(u.model, u.filters)] += u.columns.get(column, 0)  # type: ignore[assignment]  # Counter of numbers
        return sums


def _settle(buffer: Buffer, rounds: int = 200) -> None:
    """Drain until nothing is pending or in flight (failed batches need several drains)."""
    for _ in range(rounds):
        buffer.drain()
        stats = buffer.stats()
        if stats.pending_rows == 0 and stats.in_flight_batches == 0:
            return
    raise AssertionError(f"buffer did not settle: {buffer.stats()}")


class BufferContract:
    """Contract tests every backend passes; subclass and provide a ``make_buffer`` fixture."""

    #: The backend holds rows until a flush (false for pass-through backends).
    buffers: ClassVar[bool] = True
    #: The backend keeps dead letters and has ``dead_letters()`` / ``replay_dead_letters()``.
    dead_letters: ClassVar[bool] = True
    #: Threads x updates per thread in the concurrency test.
    concurrency: ClassVar[tuple[int, int]] = (8, 20_000)

    @pytest.fixture
    def make_buffer(self) -> MakeBuffer:
        """Return ``make_buffer(flush, **options) -> Buffer``; backends override this."""
        raise NotImplementedError("subclasses of BufferContract provide a make_buffer fixture")

    def _need_buffering(self) -> None:
        if not self.buffers:
            pytest.skip("backend does not buffer: every incr is written at once")

    def _need_dead_letters(self) -> None:
        self._need_buffering()
        if not self.dead_letters:
            pytest.skip("backend keeps no dead letters")

    # -- 1. merge ----------------------------------------------------------------------

    def test_merge_operators(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec)
        t = [datetime.datetime(2026, 1, 1, 12, i, tzinfo=_UTC) for i in range(4)]
        buf.incr(
            "groups",
            {"times_seen": 1, "bytes": 10},
            {"id": 42},
            {"message": "a"},
            greatest={"last_seen": t[1]},
            least={"first_seen": t[1]},
        )
        buf.incr(
            "groups",
            {"times_seen": 2},
            {"id": 42},
            {"message": "b"},
            greatest={"last_seen": t[3]},
            least={"first_seen": t[2]},
        )
        buf.incr(
            "groups",
            {"times_seen": 3, "bytes": 0.5},
            {"id": 42},
            {"level": 40},
            greatest={"last_seen": t[2]},
            least={"first_seen": t[0]},
        )
        assert buf.drain() == 1
        [update] = rec.updates()
        assert update.model == "groups"
        assert dict(update.filters) == {"id": 42}
        assert dict(update.columns) == {"times_seen": 6, "bytes": 10.5}
        assert type(update.columns["times_seen"]) is int
        assert dict(update.extra) == {"message": "b", "level": 40}
        assert dict(update.greatest) == {"last_seen": t[3]}
        assert dict(update.least) == {"first_seen": t[0]}
        assert update.count == 3
        assert update.signal_only is False

    def test_signal_only_is_true_only_when_every_update_says_so(
        self, make_buffer: MakeBuffer
    ) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec)
        buf.incr("groups", {}, {"id": 1}, signal_only=True)
        buf.incr("groups", {}, {"id": 1}, signal_only=True)
        buf.incr("groups", {}, {"id": 2}, signal_only=True)
        buf.incr("groups", {"times_seen": 1}, {"id": 2})
        buf.drain()
        flags = {u.filters["id"]: u.signal_only for u in rec.updates()}
        assert flags == {1: True, 2: False}

    def test_typed_filters_are_distinct_rows(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec)
        for value in (1, "1", 1.0, True):
            buf.incr("groups", {"n": 1}, {"id": value})
        buf.incr("groups", {"n": 1}, {"id": 1})
        buf.drain()
        got = sorted((type(u.filters["id"]).__name__, u.columns["n"]) for u in rec.updates())
        assert got == [("bool", 1), ("float", 1), ("int", 2), ("str", 1)]

    def test_filter_order_and_model_identify_the_row(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec)
        buf.incr("a", {"n": 1}, {"x": 1, "y": "z"})
        buf.incr("a", {"n": 1}, {"y": "z", "x": 1})
        buf.incr("b", {"n": 1}, {"x": 1, "y": "z"})
        buf.drain()
        assert sorted((u.model, u.columns["n"]) for u in rec.updates()) == [("a", 2), ("b", 1)]

    def test_values_round_trip_with_their_types(self, make_buffer: MakeBuffer) -> None:
        import decimal
        import uuid

        rec = Recorder()
        buf = make_buffer(rec)
        offset = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        values: dict[str, Value] = {
            "none": None,
            "flag": False,
            "big": 2**80,
            "ratio": 0.25,
            "text": "héllo",
            "raw": b"\x00\xff",
            "money": decimal.Decimal("10.50"),
            "when": datetime.datetime(2026, 5, 1, 8, 30, 0, 123456, tzinfo=offset),
            "day": datetime.date(2026, 5, 1),
            "uid": uuid.UUID(int=7),
        }
        buf.incr("things", {"n": 1}, {"id": 2**70, "k": b"\x01"}, values)
        buf.drain()
        [update] = rec.updates()
        assert dict(update.filters) == {"id": 2**70, "k": b"\x01"}
        for name, value in values.items():
            assert update.extra[name] == value and type(update.extra[name]) is type(value), name
        assert update.extra["when"].utcoffset() == offset.utcoffset(None)  # type: ignore[union-attr]  # a datetime
        assert str(update.extra["money"]) == "10.50"

    def test_subclass_values_are_delivered_as_their_base_types(
        self, make_buffer: MakeBuffer
    ) -> None:
        import decimal
        import enum

        class Level(enum.IntEnum):
            HIGH = 3

        class Kind(str, enum.Enum):
            BUG = "bug"

        class Money(decimal.Decimal):
            pass

        rec = Recorder()
        buf = make_buffer(rec)
        # bytearray is accepted at run time though outside the `Value` type.
        raw: Any = bytearray(b"ab")
        key: Any = bytearray(b"k")
        buf.incr(
            "g",
            {"n": 1},
            {"level": Level.HIGH, "kind": Kind.BUG, "raw": key},
            {"blob": raw, "type": Kind.BUG},
            greatest={"money": Money("1.5")},
        )
        raw[0] = ord("X")  # the caller reuses its buffer: what was buffered must not change
        buf.drain()
        [update] = rec.updates()
        got = {**update.filters, **{f"extra.{k}": v for k, v in update.extra.items()}}
        got["greatest.money"] = update.greatest["money"]
        assert {k: (type(v), v) for k, v in got.items()} == {
            "level": (int, 3),
            "kind": (str, "bug"),
            "raw": (bytes, b"k"),
            "extra.blob": (bytes, b"ab"),
            "extra.type": (str, "bug"),
            "greatest.money": (decimal.Decimal, decimal.Decimal("1.5")),
        }

    def test_str_enum_names_are_delivered_as_plain_str(self, make_buffer: MakeBuffer) -> None:
        import enum

        class Name(str, enum.Enum):
            MODEL = "groups"
            N = "n"
            ID = "id"
            MSG = "msg"
            LAST = "last"

        rec = Recorder()
        buf = make_buffer(rec)
        buf.incr(Name.MODEL, {Name.N: 1}, {Name.ID: 1}, {Name.MSG: "x"}, greatest={Name.LAST: 2})
        buf.drain()
        [update] = rec.updates()
        names = [update.model, *update.columns, *update.filters, *update.extra, *update.greatest]
        # A host formats names into SQL: "groups", not "Name.MODEL", on every backend.
        assert [(type(n), f"{n}") for n in names] == [
            (str, "groups"),
            (str, "n"),
            (str, "id"),
            (str, "msg"),
            (str, "last"),
        ]

    def test_get_returns_pending_update(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, delay=3600)
        assert buf.get("groups", {"id": 1}) is None
        buf.incr("groups", {"n": 2}, {"id": 1}, {"m": "x"})
        buf.incr("groups", {"n": 3}, {"id": 1})
        pending = buf.get("groups", {"id": 1})
        assert pending is not None
        assert pending.columns["n"] == 5 and pending.extra["m"] == "x" and pending.count == 2
        assert buf.get("groups", {"id": "1"}) is None
        buf.drain()
        assert buf.get("groups", {"id": 1}) is None

    # -- 2. validation ------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("args", "kwargs", "field"),
        [
            (("", {"n": 1}, {"id": 1}), {}, "model"),
            (("g", {"n": True}, {"id": 1}), {}, "columns['n']"),
            (("g", {"n": float("nan")}, {"id": 1}), {}, "columns['n']"),
            (("g", {"n": 2**63}, {"id": 1}), {}, "columns['n']"),
            (("g", {"n": "1"}, {"id": 1}), {}, "columns['n']"),
            (("g", {"n": 1}, {"id": [1]}), {}, "filters['id']"),
            (("g", {"n": 1}, {"id": datetime.datetime(2026, 1, 1)}), {}, "filters['id']"),
            (("g", {"n": 1}, {"id": 1}, {"m": object()}), {}, "extra['m']"),
            (("g", {"n": 1}, {"id": 1}), {"greatest": {"t": None}}, "greatest['t']"),
            (("g", {"n": 1}, {"id": 1}), {"least": {"t": [1]}}, "least['t']"),
        ],
    )
    def test_invalid_updates_are_rejected_before_storing(
        self, make_buffer: MakeBuffer, args: tuple[Any, ...], kwargs: dict[str, Any], field: str
    ) -> None:
        rec = Recorder()
        buf = make_buffer(rec)
        with pytest.raises(InvalidUpdateError) as info:
            buf.incr(*args, **kwargs)
        assert isinstance(info.value, ValueError)
        assert field in str(info.value)
        assert info.value.field == field
        assert rec.calls == []
        buf.drain()
        assert rec.calls == [] and buf.stats().updates_accepted == 0

    def test_integer_sum_overflow_keeps_the_row(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec)
        buf.incr("g", {"n": 2**63 - 1}, {"id": 1})
        with pytest.raises(InvalidUpdateError, match=r"columns\['n'\]"):
            buf.incr("g", {"n": 1}, {"id": 1})
        buf.incr("g", {"n": -1}, {"id": 1})
        buf.drain()
        [update] = rec.updates()
        assert update.columns["n"] == 2**63 - 2 and update.count == 2

    # -- 3. delivery --------------------------------------------------------------------

    def test_failed_batch_is_redelivered_with_same_id(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder(fail_times=2)
        buf = make_buffer(rec, max_attempts=5, retry_backoff=0)
        for i in range(10):
            buf.incr("g", {"n": 1}, {"id": i % 3})
        _settle(buf)
        # Backends may spread rows over several batches (partitions); every batch keeps its id
        # and counts its attempts up from 1, and every row is applied exactly once.
        attempts: dict[str, list[int]] = {}
        for batch in rec.calls:
            attempts.setdefault(batch.id, []).append(batch.attempt)
        assert all(a == list(range(1, len(a) + 1)) for a in attempts.values()), attempts
        assert sum(len(a) for a in attempts.values()) == len(attempts) + 2
        assert rec.total("n") == 10
        assert len(rec.updates()) == 3
        stats = buf.stats()
        assert stats.callback_failures == 2 and stats.rows_flushed == 3
        # retries counts the deliveries with attempt > 1 (BufferStats' docstring).
        assert stats.retries == sum(1 for batch in rec.calls if batch.attempt > 1) == 2

    def test_updates_during_failed_batch_are_kept_separately(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder(fail_times=1)
        buf = make_buffer(rec, max_attempts=5, retry_backoff=0)
        buf.incr("g", {"n": 1}, {"id": 1}, {"v": "old"})
        buf.drain()  # fails: the batch is kept
        buf.incr("g", {"n": 10}, {"id": 1}, {"v": "new"})
        pending = buf.get("g", {"id": 1})
        assert pending is not None and pending.columns["n"] == 11
        _settle(buf)
        assert rec.total("n") == 11
        assert rec.applied[-1][0].extra["v"] == "new"  # the newer extra is applied last
        assert rec.overlaps == []

    def test_get_merges_a_failed_batch_with_newer_values_of_another_type(
        self, make_buffer: MakeBuffer
    ) -> None:
        # incr checks a value against the pending row only: a failed batch may hold an int
        # where newer updates hold a str. They are delivered apart; get() shows the newer one.
        self._need_buffering()
        rec = Recorder(fail_times=1)
        buf = make_buffer(rec, max_attempts=5, retry_backoff=3600)
        buf.incr("g", {"n": 1}, {"id": 1}, greatest={"t": 5}, least={"u": 5})
        buf.drain()  # fails: the batch is kept
        buf.incr("g", {"n": 2}, {"id": 1}, greatest={"t": "x"}, least={"u": b"y"})
        pending = buf.get("g", {"id": 1})
        assert pending is not None
        assert dict(pending.columns) == {"n": 3}
        assert dict(pending.greatest) == {"t": "x"} and dict(pending.least) == {"u": b"y"}
        assert pending.count == 2

    def test_a_callback_changing_what_it_is_handed_changes_nothing_buffered(
        self, make_buffer: MakeBuffer
    ) -> None:
        # Hosts reuse the mappings they are handed (`values = u.columns; values.update(...)`);
        # a redelivery, get() and a dead letter still hold what was buffered.
        self._need_buffering()
        seen: list[tuple[dict[str, Any], ...]] = []

        def flush(batch: Batch) -> None:
            for u in batch:
                seen.append(tuple(dict(m) for m in (u.filters, u.columns, u.extra, u.greatest)))
                for mapping in (u.filters, u.columns, u.extra, u.greatest):
                    mapping.clear()  # type: ignore[attr-defined]  # a dict at run time
                    mapping["id"] = 99  # type: ignore[index]  # a dict at run time
            raise RuntimeError("the write failed")

        buf = make_buffer(flush, max_attempts=2, retry_backoff=3600)
        buf.incr("g", {"n": 1}, {"id": 1}, {"m": "x"}, greatest={"t": 5})
        buf.drain()  # attempt 1 fails: the batch is kept
        pending = buf.get("g", {"id": 1})
        letters = []
        for _ in range(5):  # redelivered until the row alone is dead-lettered
            buf.drain()
            letters = buf.dead_letters()  # type: ignore[attr-defined]  # dead_letters flag
            if letters:
                break
        first = ({"id": 1}, {"n": 1}, {"m": "x"}, {"t": 5})
        assert len(seen) >= 2 and all(delivered == first for delivered in seen), seen
        assert pending is not None
        got = (pending.filters, pending.columns, pending.extra, pending.greatest)
        assert tuple(map(dict, got)) == first
        if self.dead_letters:
            [letter] = letters
            held = letter.update
            got = (held.filters, held.columns, held.extra, held.greatest)
            assert tuple(map(dict, got)) == first

    def test_poison_row_is_isolated_and_dead_lettered(self, make_buffer: MakeBuffer) -> None:
        self._need_dead_letters()
        rec = Recorder(poison=(("g", {"id": 3}),))
        buf = make_buffer(rec, max_attempts=2, retry_backoff=0, batch_size=100)
        for i in range(10):
            buf.incr("g", {"n": i + 1}, {"id": i})
        _settle(buf)
        assert rec.total("n") == 55 - 4
        stats = buf.stats()
        assert stats.dead_letters == 1 and stats.dead_lettered == 1
        letters = buf.dead_letters()  # type: ignore[attr-defined]  # dead-letter API
        assert [dict(dl.update.filters) for dl in letters] == [{"id": 3}]
        assert letters[0].update.columns["n"] == 4
        assert "poisoned" in letters[0].error
        # Split halves carry their parent's id (batch_lineage), which a ledger relies on.
        lineage = batch_lineage(letters[0].batch_id)
        assert len(lineage) > 1 and lineage[-1] in {b.id for b in rec.calls}
        rec.poison.clear()
        assert buf.replay_dead_letters() == 1  # type: ignore[attr-defined]  # dead-letter API
        _settle(buf)
        assert rec.total("n") == 55
        assert buf.stats().dead_letters == 0

    def _two_dead_letters_of_one_row(
        self, make_buffer: MakeBuffer, first: dict[str, Any], second: dict[str, Any]
    ) -> tuple[Buffer, Recorder]:
        """Dead-letter two updates of row ``g/{id: 1}``, *first* then *second* (``incr`` kwargs)."""
        self._need_dead_letters()
        rec = Recorder(poison=(("g", {"id": 1}),))
        buf = make_buffer(rec, max_attempts=1, retry_backoff=0)
        for kwargs in (first, second):
            buf.incr("g", filters={"id": 1}, **kwargs)
            _settle(buf)
        assert buf.stats().dead_letters == 2
        rec.poison.clear()
        return buf, rec

    def test_replayed_letters_of_one_row_keep_their_order(self, make_buffer: MakeBuffer) -> None:
        buf, rec = self._two_dead_letters_of_one_row(
            make_buffer, {"columns": {"n": 1}, "extra": {"e": "old"}}, {"extra": {"e": "new"}}
        )
        buf.incr("g", {"n": 10}, {"id": 2}, {"e": "other row"})
        assert buf.replay_dead_letters() == 2  # type: ignore[attr-defined]  # dead-letter API
        _settle(buf)
        [row] = [u for u in rec.updates() if u.filters == {"id": 1}]
        assert (dict(row.columns), dict(row.extra), row.count) == ({"n": 1}, {"e": "new"}, 2)

    def test_replayed_letter_wins_a_tie_with_newer_data(self, make_buffer: MakeBuffer) -> None:
        # Equal instants, other offsets: Python's min/max keep the earlier value on a tie, and the
        # letter's update came before the pending one.
        east = datetime.timezone(datetime.timedelta(hours=14))
        west = datetime.timezone(-datetime.timedelta(hours=5, minutes=30))
        early = datetime.datetime(2024, 1, 2, 14, 0, tzinfo=east)
        same = early.astimezone(west)
        self._need_dead_letters()
        rec = Recorder(poison=(("g", {"id": 1}),))
        buf = make_buffer(rec, max_attempts=1, retry_backoff=0)
        buf.incr("g", None, {"id": 1}, least={"t": early}, greatest={"u": early})
        _settle(buf)
        rec.poison.clear()
        buf.incr("g", None, {"id": 1}, least={"t": same}, greatest={"u": same})
        assert buf.replay_dead_letters() == 1  # type: ignore[attr-defined]  # dead-letter API
        _settle(buf)
        [row] = rec.updates()
        offsets = {
            v.utcoffset()
            for v in (row.least["t"], row.greatest["u"])
            if isinstance(v, datetime.datetime)
        }
        assert offsets == {early.utcoffset()}

    def test_replay_refusing_a_merge_keeps_the_letter(self, make_buffer: MakeBuffer) -> None:
        buf, rec = self._two_dead_letters_of_one_row(
            make_buffer, {"columns": {"n": 2**63 - 1}}, {"columns": {"n": 1}}
        )
        # The two letters cannot merge (their sum leaves signed 64-bit): one is replayed, the
        # other stays dead with the reason, as incr would have refused it.
        assert buf.replay_dead_letters() == 1  # type: ignore[attr-defined]  # dead-letter API
        [kept] = buf.dead_letters()  # type: ignore[attr-defined]  # dead-letter API
        assert "replay refused" in kept.error
        _settle(buf)
        [row] = rec.updates()
        assert row.columns["n"] + kept.update.columns["n"] == 2**63

    def test_every_row_delivered_once_without_failures(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, batch_size=7)
        for i in range(100):
            buf.incr("g", {"n": 1}, {"id": i % 40})
        assert buf.drain() == 40
        assert all(len(b) <= 7 for b in rec.calls)
        for batch in rec.calls:
            keys = [row_identity(u.model, u.filters) for u in batch]
            assert len(keys) == len(set(keys)), "a batch holds the same row twice"
        assert sorted(rec.per_row("n").values()) == [2] * 20 + [3] * 20
        assert len({b.id for b in rec.calls}) == len(rec.calls)

    # -- 4. delay -----------------------------------------------------------------------

    def test_delay_counts_from_first_update(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, delay=0.6)
        buf.incr("g", {"n": 1}, {"id": 1})
        assert buf.process_pending() == 0
        time.sleep(0.4)
        buf.incr("g", {"n": 1}, {"id": 1})  # must not postpone the row
        assert buf.process_pending() == 0
        time.sleep(0.35)
        assert buf.process_pending() == 1
        assert rec.total("n") == 2

    def test_drain_ignores_delay(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, delay=3600)
        buf.incr("g", {"n": 1}, {"id": 1})
        assert buf.process_pending() == 0
        assert buf.stats().pending_rows == 1
        assert buf.stats().oldest_pending_age is not None
        assert buf.drain() == 1
        assert buf.stats().pending_rows == 0

    def test_process_pending_honours_backoff(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder(fail_times=1)
        buf = make_buffer(rec, retry_backoff=30, max_attempts=5)
        buf.incr("g", {"n": 1}, {"id": 1})
        assert buf.process_pending() == 0
        assert buf.process_pending() == 0  # backoff not elapsed
        assert len(rec.calls) == 1
        assert buf.drain() == 1  # drain ignores backoff
        assert rec.calls[-1].attempt == 2

    # -- 5. concurrency -----------------------------------------------------------------

    def test_threads_with_flusher_lose_nothing(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, batch_size=200)
        threads, per_thread = self.concurrency

        def produce(seed: int) -> None:
            for i in range(per_thread):
                buf.incr("g", {"n": 1, "w": 2}, {"id": (i * 7 + seed) % 500})

        with Flusher(buf, interval=0.005):
            workers = [threading.Thread(target=produce, args=(s,)) for s in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        _settle(buf)
        assert rec.total("n") == threads * per_thread
        assert rec.total("w") == 2 * threads * per_thread
        assert buf.stats().updates_accepted == threads * per_thread
        assert rec.overlaps == []

    def test_concurrent_flushers_never_share_a_row(self, make_buffer: MakeBuffer) -> None:
        self._need_buffering()
        rec = Recorder()
        buf = make_buffer(rec, batch_size=5)
        stop = threading.Event()

        def flush_loop() -> None:
            while not stop.is_set():
                buf.process_pending()

        flushers = [threading.Thread(target=flush_loop) for _ in range(3)]
        for f in flushers:
            f.start()
        for i in range(3000):
            buf.incr("g", {"n": 1}, {"id": i % 50})
        stop.set()
        for f in flushers:
            f.join()
        _settle(buf)
        assert rec.overlaps == []
        assert rec.total("n") == 3000

    # -- lifecycle ----------------------------------------------------------------------

    def test_close_drains_and_is_idempotent(self, make_buffer: MakeBuffer) -> None:
        rec = Recorder()
        # Shared backends keep rows for other workers on close unless told to drain.
        buf = make_buffer(rec, delay=3600, drain_on_close=True)
        buf.incr("g", {"n": 1}, {"id": 1})
        buf.close()
        buf.close()
        assert rec.total("n") == 1
        with pytest.raises(UpdateBufferError):
            buf.incr("g", {"n": 1}, {"id": 1})

    def test_context_manager_closes(self, make_buffer: MakeBuffer) -> None:
        rec = Recorder()
        with make_buffer(rec, delay=3600, drain_on_close=True) as buf:
            buf.incr("g", {"n": 1}, {"id": 1})
        assert rec.total("n") == 1

    def test_flusher_stop_drains(self, make_buffer: MakeBuffer) -> None:
        rec = Recorder()
        buf = make_buffer(rec, delay=3600)
        flusher = Flusher(buf, interval=0.01).start()
        buf.incr("g", {"n": 1}, {"id": 1})
        flusher.stop()
        flusher.stop()
        assert rec.total("n") == 1
        assert not flusher.running

    def test_stats_counts_updates(self, make_buffer: MakeBuffer) -> None:
        rec = Recorder()
        buf = make_buffer(rec)
        for i in range(5):
            buf.incr("g", {"n": 1}, {"id": i % 2})
        buf.drain()
        stats = buf.stats()
        assert stats.updates_accepted == 5
        assert stats.rows_flushed == (2 if self.buffers else 5)
        assert stats.pending_rows == 0 and stats.in_flight_batches == 0
        assert isinstance(buf, Buffer)
