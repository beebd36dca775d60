"""DESIGN 3.2: invalid updates are refused at ``incr``, naming field and type, storing nothing."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest

import updatebuffer
from updatebuffer import InvalidUpdateError

UTC = datetime.timezone.utc
NOW = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


class Recorder:
    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)


@pytest.fixture(params=["memory", "direct"])
def backend(request):
    return request.param


@pytest.fixture
def flush():
    return Recorder()


@pytest.fixture
def buf(backend, flush):
    buffer = updatebuffer.from_url(f"{backend}://", flush=flush)
    yield buffer
    buffer.close()


def call(buffer, *, model="groups", columns=None, filters=None, **kwargs):
    buffer.incr(
        model,
        {"times_seen": 1} if columns is None else columns,
        {"id": 1} if filters is None else filters,
        **kwargs,
    )


# (id, incr arguments, field named in the error, type named in the error)
REJECTED = [
    # model
    ("model-empty", {"model": ""}, "model", "str"),
    ("model-none", {"model": None}, "model", "NoneType"),
    ("model-int", {"model": 5}, "model", "int"),
    ("model-bytes", {"model": b"groups"}, "model", "bytes"),
    # column names
    ("column-name-int", {"columns": {1: 1}}, "columns key", "int"),
    ("column-name-none", {"columns": {None: 1}}, "columns key", "NoneType"),
    ("column-name-empty", {"columns": {"": 1}}, "columns key", "str"),
    ("columns-not-mapping", {"columns": [("times_seen", 1)]}, "columns", "list"),
    # column deltas
    ("delta-bool", {"columns": {"times_seen": True}}, "columns['times_seen']", "bool"),
    ("delta-str", {"columns": {"times_seen": "1"}}, "columns['times_seen']", "str"),
    ("delta-none", {"columns": {"times_seen": None}}, "columns['times_seen']", "NoneType"),
    ("delta-nan", {"columns": {"times_seen": float("nan")}}, "columns['times_seen']", "float"),
    ("delta-inf", {"columns": {"times_seen": float("inf")}}, "columns['times_seen']", "float"),
    ("delta-ninf", {"columns": {"times_seen": float("-inf")}}, "columns['times_seen']", "float"),
    (
        "delta-decimal",
        {"columns": {"times_seen": decimal.Decimal("1")}},
        "columns['times_seen']",
        "decimal.Decimal",
    ),
    ("delta-2**63", {"columns": {"times_seen": 2**63}}, "columns['times_seen']", "int"),
    ("delta-<-2**63", {"columns": {"times_seen": INT64_MIN - 1}}, "columns['times_seen']", "int"),
    ("delta-huge", {"columns": {"times_seen": 10**30}}, "columns['times_seen']", "int"),
    # filter values and names
    ("filter-list", {"filters": {"id": [1]}}, "filters['id']", "list"),
    ("filter-dict", {"filters": {"id": {"a": 1}}}, "filters['id']", "dict"),
    ("filter-object", {"filters": {"id": object()}}, "filters['id']", "object"),
    ("filter-set", {"filters": {"id": {1}}}, "filters['id']", "set"),
    ("filter-complex", {"filters": {"id": 1j}}, "filters['id']", "complex"),
    (
        "filter-naive-datetime",
        {"filters": {"id": datetime.datetime(2024, 1, 1)}},
        "filters['id']",
        "datetime.datetime",
    ),
    ("filter-nan", {"filters": {"id": float("nan")}}, "filters['id']", "float"),
    ("filter-inf", {"filters": {"id": float("inf")}}, "filters['id']", "float"),
    (
        "filter-decimal-nan",
        {"filters": {"id": decimal.Decimal("NaN")}},
        "filters['id']",
        "decimal.Decimal",
    ),
    ("filter-second-bad", {"filters": {"id": 1, "kind": [2]}}, "filters['kind']", "list"),
    ("filter-name-int", {"filters": {1: 1}}, "filters key", "int"),
    ("filter-name-empty", {"filters": {"": 1}}, "filters key", "str"),
    ("filters-not-mapping", {"filters": [("id", 1)]}, "filters", "list"),
    # extra
    ("extra-list", {"extra": {"message": [1]}}, "extra['message']", "list"),
    ("extra-object", {"extra": {"message": object()}}, "extra['message']", "object"),
    (
        "extra-naive-datetime",
        {"extra": {"last_seen": datetime.datetime(2024, 1, 1)}},
        "extra['last_seen']",
        "datetime.datetime",
    ),
    ("extra-nan", {"extra": {"score": float("nan")}}, "extra['score']", "float"),
    (
        "extra-decimal-inf",
        {"extra": {"score": decimal.Decimal("Infinity")}},
        "extra['score']",
        "decimal.Decimal",
    ),
    ("extra-name-int", {"extra": {1: "a"}}, "extra key", "int"),
    ("extra-not-mapping", {"extra": [("message", "boom")]}, "extra", "list"),
    # greatest / least
    ("greatest-none", {"greatest": {"last_seen": None}}, "greatest['last_seen']", "NoneType"),
    ("greatest-bool", {"greatest": {"last_seen": True}}, "greatest['last_seen']", "bool"),
    ("greatest-list", {"greatest": {"last_seen": [NOW]}}, "greatest['last_seen']", "list"),
    (
        "greatest-naive",
        {"greatest": {"last_seen": datetime.datetime(2024, 1, 1)}},
        "greatest['last_seen']",
        "datetime.datetime",
    ),
    ("least-none", {"least": {"first_seen": None}}, "least['first_seen']", "NoneType"),
    ("least-bool", {"least": {"first_seen": False}}, "least['first_seen']", "bool"),
    ("least-list", {"least": {"first_seen": []}}, "least['first_seen']", "list"),
    ("least-nan", {"least": {"first_seen": float("nan")}}, "least['first_seen']", "float"),
    # signal_only
    ("signal-only-int", {"signal_only": 1}, "signal_only", "int"),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "field", "type_name"), REJECTED, ids=[case[0] for case in REJECTED]
)
def test_invalid_update_is_rejected_and_nothing_is_stored(
    buf, backend, flush, case, kwargs, field, type_name
):
    call(buf, columns={"times_seen": 1})  # an existing row that a rejected update must not touch
    before_stats = buf.stats()
    before_row = buf.get("groups", {"id": 1})
    flushed = len(flush.batches)

    with pytest.raises(InvalidUpdateError) as info:
        call(buf, **kwargs)

    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, updatebuffer.UpdateBufferError)
    message = str(err)
    assert field in message
    assert type_name in message
    assert err.field == field
    assert err.got == type_name
    after = buf.stats()
    assert after.updates_accepted == before_stats.updates_accepted
    assert after.pending_rows == before_stats.pending_rows
    assert len(flush.batches) == flushed
    assert buf.get("groups", {"id": 1}) == before_row
    if backend == "memory":
        assert before_row is not None
        assert before_row.columns == {"times_seen": 1}


def test_empty_filters_are_rejected(buf, flush):
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("groups", {"times_seen": 1}, {})
    err = info.value
    assert isinstance(err, ValueError)
    assert "filters" in str(err)
    assert err.field == "filters"
    assert err.got == "dict"
    assert buf.stats().updates_accepted == 0
    assert flush.batches == []


def test_filters_none_is_rejected(buf, flush):
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("groups", {"times_seen": 1}, None)
    assert info.value.field == "filters"
    assert info.value.got == "NoneType"
    assert buf.stats().updates_accepted == 0
    assert flush.batches == []


@pytest.mark.parametrize(
    ("held", "delta"),
    [(1, INT64_MIN - 1), (-1, 2**63), (2**62, -(2**63) - 2**62)],
    ids=repr,
)
def test_out_of_range_delta_into_a_pending_row_is_rejected_even_if_the_sum_fits(
    backend, buf, held, delta
):
    buf.incr("groups", {"times_seen": held}, {"id": 1})
    with pytest.raises(InvalidUpdateError, match=r"columns\['times_seen'\].*int"):
        buf.incr("groups", {"times_seen": delta}, {"id": 1})
    assert buf.stats().updates_accepted == 1


@pytest.mark.parametrize("delta", [INT64_MAX, INT64_MIN, 0, -1, 1.5, -0.0, 1e300], ids=repr)
def test_boundary_deltas_are_accepted(buf, delta):
    buf.incr("groups", {"times_seen": delta}, {"id": 1})
    assert buf.stats().updates_accepted == 1


def test_every_supported_type_is_accepted(buf):
    every = {
        "none": None,
        "bool": True,
        "int": 2**100,
        "float": -0.0,
        "str": "héllo",
        "bytes": b"\x00",
        "decimal": decimal.Decimal("1.10"),
        "datetime": NOW,
        "date": datetime.date(2024, 5, 1),
        "uuid": uuid.UUID(int=7),
    }
    ordered = {k: v for k, v in every.items() if k not in {"none", "bool"}}
    buf.incr(
        "groups",
        {"times_seen": 1},
        every,
        {f"set_{k}": v for k, v in every.items()},
        greatest={f"max_{k}": v for k, v in ordered.items()},
        least={f"min_{k}": v for k, v in ordered.items()},
    )
    assert buf.stats().updates_accepted == 1


# -- rejected only where updates are merged (memory) ---------------------------------------


@pytest.mark.parametrize(
    ("first", "second"), [(INT64_MAX, 1), (INT64_MIN, -1), (2**62, 2**62)], ids=repr
)
def test_merged_int_sum_overflow_is_rejected_and_the_row_kept(flush, first, second):
    buf = updatebuffer.from_url("memory://", flush=flush)
    buf.incr("groups", {"times_seen": first, "other": 1}, {"id": 1})
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("groups", {"other": 1, "times_seen": second}, {"id": 1}, {"message": "x"})
    err = info.value
    assert isinstance(err, ValueError)
    assert "columns['times_seen']" in str(err)
    assert "int" in str(err)
    assert err.field == "columns['times_seen']"
    pending = buf.get("groups", {"id": 1})
    assert pending is not None
    # The whole update was refused: no column, extra or count of it was applied.
    assert pending.columns == {"times_seen": first, "other": 1}
    assert pending.extra == {}
    assert pending.count == 1
    assert buf.stats().updates_accepted == 1
    # The row still takes updates that fit.
    buf.incr("groups", {"times_seen": -1 if first > 0 else 1}, {"id": 1})
    assert buf.get("groups", {"id": 1}).columns["times_seen"] == first + (-1 if first > 0 else 1)
    buf.drain()
    assert [u.columns["times_seen"] for b in flush.batches for u in b] == [
        first + (-1 if first > 0 else 1)
    ]
    buf.close()


def test_direct_has_no_merged_sum_to_overflow(flush):
    buf = updatebuffer.from_url("direct://", flush=flush)
    buf.incr("groups", {"times_seen": INT64_MAX}, {"id": 1})
    buf.incr("groups", {"times_seen": 1}, {"id": 1})
    assert [u.columns for b in flush.batches for u in b] == [
        {"times_seen": INT64_MAX},
        {"times_seen": 1},
    ]


def test_greatest_of_another_type_than_the_buffered_one_is_rejected(flush):
    buf = updatebuffer.from_url("memory://", flush=flush)
    buf.incr("groups", {"times_seen": 1}, {"id": 1}, greatest={"last_seen": NOW})
    before = buf.get("groups", {"id": 1})
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("groups", {"times_seen": 1}, {"id": 1}, greatest={"last_seen": "yesterday"})
    err = info.value
    assert isinstance(err, ValueError)
    message = str(err)
    assert "greatest['last_seen']" in message
    assert "str" in message
    assert "datetime.datetime" in message
    assert err.field == "greatest['last_seen']"
    assert buf.get("groups", {"id": 1}) == before
    assert buf.stats().updates_accepted == 1
    buf.close()


def test_least_of_another_type_than_the_buffered_one_is_rejected(flush):
    buf = updatebuffer.from_url("memory://", flush=flush)
    buf.incr("groups", None, {"id": 1}, least={"first_seen": datetime.date(2024, 1, 1)})
    with pytest.raises(InvalidUpdateError, match=r"least\['first_seen'\].*datetime\.datetime"):
        buf.incr("groups", None, {"id": 1}, least={"first_seen": NOW})
    assert buf.get("groups", {"id": 1}).least == {"first_seen": datetime.date(2024, 1, 1)}
    buf.close()


@pytest.mark.parametrize(
    ("delta", "shown"),
    [(decimal.Decimal("1.5"), "Decimal('1.5')"), ("1", "'1'")],
    ids=repr,
)
def test_a_delta_of_another_number_type_says_what_is_accepted_and_what_was_given(buf, delta, shown):
    with pytest.raises(InvalidUpdateError) as info:
        call(buf, columns={"n": delta})
    message = str(info.value)
    assert message.startswith("columns['n']: delta must be an int or a finite float, got ")
    assert shown in message
    assert message.endswith("; convert it with float() or int()")
    assert info.value.expected == "int or finite float"
