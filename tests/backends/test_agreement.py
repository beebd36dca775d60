"""Memory and Redis agree to the bit: sums, greatest/least and refusals (DESIGN 9, "Number
precision"). Python's own left-to-right arithmetic and comparisons are the reference.
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import math
import sys

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import updatebuffer
from updatebuffer import InvalidUpdateError
from updatebuffer.backends.memory import MemoryBuffer
from updatebuffer.backends.redis import RedisBuffer, _order_key
from updatebuffer.testing.contract import Recorder

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UTC = datetime.timezone.utc
_prefixes = itertools.count()

# Floats whose Redis HINCRBYFLOAT sums were wrong, and the extremes of the double range.
FLOAT_EDGES = [
    1e-20,
    1.234567891234e-12,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,  # smallest normal
    2.225073858507201e-308,  # largest subnormal
    1e308,
    -1e308,
    sys.float_info.max,
    0.1,
    -0.0,
    0.0,
    1e16,
    2.0**53,
]
deltas = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(FLOAT_EDGES),
    st.integers(INT64_MIN, INT64_MAX),
    st.integers(-1000, 1000),
)


def exact(value):
    """A key equal only for the same type and the same bits (float.hex tells -0.0 from 0.0)."""
    if type(value) is float:
        return ("float", value.hex())
    if isinstance(value, datetime.datetime):
        # fold means nothing for a fixed offset, and the codec does not keep it.
        return (type(value).__name__, repr(value.replace(fold=0)), value.utcoffset())
    return (type(value).__name__, repr(value))


def exact_update(update):
    return (
        update.model,
        sorted((k, exact(v)) for k, v in update.filters.items()),
        sorted((k, exact(v)) for k, v in update.columns.items()),
        sorted((k, exact(v)) for k, v in update.extra.items()),
        sorted((k, exact(v)) for k, v in update.greatest.items()),
        sorted((k, exact(v)) for k, v in update.least.items()),
        update.signal_only,
        update.count,
    )


def reference_sum(values):
    """Python's left-to-right sum; a step leaving int64 or the finite range is refused."""
    total = None
    accepted = []
    for delta in values:
        candidate = delta if total is None else total + delta
        if type(candidate) is int and not INT64_MIN <= candidate <= INT64_MAX:
            accepted.append(False)
            continue
        if type(candidate) is float and not math.isfinite(candidate):
            accepted.append(False)
            continue
        total = candidate
        accepted.append(True)
    return total, accepted


@pytest.fixture(scope="module")
def redis_client(redis_server):
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


def make(kind, rec, client=None):
    if kind == "memory":
        return MemoryBuffer(flush=rec)
    if kind == "direct":
        return updatebuffer.from_url("direct://", flush=rec)
    return RedisBuffer(
        flush=rec,
        client=client,
        key_prefix=f"agree{next(_prefixes)}",
        delay=0,
        local_window=30 if kind == "redis-window" else 0,
    )


def run(kind, calls, client=None):
    """Apply ``calls`` (incr keyword dicts) and drain; return refusals and delivered updates."""
    rec = Recorder()
    buf = make(kind, rec, client)
    refused = []
    try:
        for call in calls:
            try:
                buf.incr(**call)
            except InvalidUpdateError as exc:  # noqa: PERF203 - recording each refusal is the point
                refused.append(exc.field)
            else:
                refused.append(None)
        buf.drain()
    finally:
        buf.close()
    return refused, sorted(exact_update(u) for u in rec.updates())


def agree(calls, client):
    memory = run("memory", calls)
    assert run("redis", calls, client) == memory
    return memory


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- sums --------------------------------------------------------------------------------------


@given(st.lists(deltas, min_size=1, max_size=12))
@example([1e-20, 1e-20])
@example([1.234567891234e-12, 1e-20])
@example([2**62, 0.5, 2**62])
@example([1e308, 1e308, -1e308])
@example([5e-324, 5e-324, -0.0])
@example([-0.0, -0.0])
@example([INT64_MAX, 0.5, 1])
@example([0.1, 3, INT64_MAX, INT64_MAX])
@SETTINGS
def test_sums_are_pythons_left_to_right_sum_to_the_bit(redis_client, values):
    calls = [{"model": "g", "columns": {"n": v}, "filters": {"id": 1}} for v in values]
    refused, updates = agree(calls, redis_client)
    total, accepted = reference_sum(values)
    assert [r is None for r in refused] == accepted
    assert all(r in (None, "columns['n']") for r in refused)
    [update] = updates
    assert update[2] == [("n", exact(total))]
    assert update[7] == accepted.count(True)


@given(st.lists(st.tuples(st.sampled_from("ab"), deltas), min_size=1, max_size=10))
@SETTINGS
def test_two_columns_and_a_second_filter_go_through_the_general_path(redis_client, items):
    calls = [
        {"model": "g", "columns": {name: v, "z": 1}, "filters": {"id": 1, "k": "x"}}
        for name, v in items
    ]
    agree(calls, redis_client)


def test_float_sums_that_hincrbyfloat_rounded_are_exact(redis_client):
    for values in ([1e-20], [1e-20, 1e-20], [1.234567891234e-12], [0.1, 0.2]):
        calls = [{"model": "g", "columns": {"n": v}, "filters": {"id": 1}} for v in values]
        _, [update] = run("redis", calls, redis_client)
        assert update[2] == [("n", exact(reference_sum(values)[0]))]


def test_int_then_float_then_int_follows_python(redis_client):
    calls = [{"model": "g", "columns": {"n": v}, "filters": {"id": 1}} for v in (2**62, 0.5, 2**62)]
    refused, [update] = run("redis", calls, redis_client)
    assert refused == [None, None, None]
    assert update[2] == [("n", exact(2**62 + 0.5 + 2**62))]


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-window"])
def test_a_sum_leaving_the_finite_range_is_refused_and_the_row_kept(redis_client, kind):
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    buf.incr("g", {"x": 1e308, "n": 1}, {"id": 1}, {"m": "a"})
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("g", {"n": 1, "x": 1e308}, {"id": 1}, {"m": "b"})
    assert info.value.field == "columns['x']"
    assert "finite" in str(info.value)
    buf.incr("g", {"x": -1e308}, {"id": 2}, {"m": "a"})
    with pytest.raises(InvalidUpdateError, match=r"columns\['x'\]"):
        buf.incr("g", {"x": -sys.float_info.max}, {"id": 2})
    buf.drain()
    got = {u.filters["id"]: (u.columns, u.extra, u.count) for u in rec.updates()}
    assert got == {1: ({"x": 1e308, "n": 1}, {"m": "a"}, 1), 2: ({"x": -1e308}, {"m": "a"}, 1)}
    buf.close()


# -- greatest / least --------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(),
    st.integers(2**53 - 10, 2**53 + 10),
    st.integers(10**18, 10**18 + 300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=25),
    st.sampled_from([0, -0.0, 0.0, decimal.Decimal("0E+5"), decimal.Decimal("-0.000"), 10**400]),
)
moments = st.datetimes(
    min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30)
).map(lambda d: d.replace(tzinfo=UTC))


def py_lt(a, b):
    return a < b


@given(numbers, numbers)
@example(2**53, 2**53 + 1)
@example(1_700_000_000_000_000_000, 1_700_000_000_000_000_100)
@example(decimal.Decimal("0.12345678901234567891"), decimal.Decimal("0.12345678901234567892"))
@example(decimal.Decimal("1.10"), 1.1)
@example(1, decimal.Decimal("1.000"))
@example(-0.0, 0)
@example(10**400, 1e308)
@example(-(10**400) - 1, -(10**400))
@example(decimal.Decimal("-0.12"), decimal.Decimal("-0.123"))
@settings(max_examples=3000)
def test_number_order_keys_compare_bytewise_as_python_compares(a, b):
    ka, kb = _order_key(a, "x"), _order_key(b, "x")
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)


@given(moments, moments, st.integers(-1439, 1439), st.integers(-1439, 1439))
@example(
    datetime.datetime(1, 1, 2, tzinfo=UTC),
    datetime.datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=UTC),
    0,
    0,
)
@example(
    datetime.datetime(9999, 12, 30, 23, 59, 59, 999998, tzinfo=UTC),
    datetime.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
    0,
    0,
)
@settings(max_examples=1000)
def test_datetime_order_keys_compare_instants_exactly(a, b, ma, mb):
    a = a.astimezone(datetime.timezone(datetime.timedelta(minutes=ma)))
    b = b.astimezone(datetime.timezone(datetime.timedelta(minutes=mb)))
    ka, kb = _order_key(a, "x"), _order_key(b, "x")
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)
    da, db = a.date(), b.date()
    assert (_order_key(da, "x") < _order_key(db, "x")) == (da < db)


@given(st.lists(numbers, min_size=1, max_size=8))
@example([1_700_000_000_000_000_000, 1_700_000_000_000_000_100, 1_700_000_000_000_000_050])
@example([decimal.Decimal("1." + "0" * 30 + "1"), decimal.Decimal("1." + "0" * 30 + "2")])
@example([1, 1.0, decimal.Decimal("1.00")])
@example([10**400, 10**400 + 1, 1e308])
@SETTINGS
def test_greatest_and_least_of_numbers_agree_exactly(redis_client, values):
    calls = [
        {"model": "g", "filters": {"id": 1}, "greatest": {"hi": v}, "least": {"lo": v}}
        for v in values
    ]
    _, [update] = agree(calls, redis_client)
    hi, lo = values[0], values[0]
    for v in values[1:]:
        hi = v if v > hi else hi
        lo = v if v < lo else lo
    assert update[4] == [("hi", exact(hi))]
    assert update[5] == [("lo", exact(lo))]


@given(st.lists(moments, min_size=1, max_size=6), st.lists(st.integers(-1439, 1439), min_size=6))
@example(
    [
        datetime.datetime(9999, 12, 30, 23, 59, 59, 999998, tzinfo=UTC),
        datetime.datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.datetime(9999, 12, 30, 23, 59, 59, 999997, tzinfo=UTC),
    ],
    [0] * 6,
)
@SETTINGS
def test_greatest_and_least_of_datetimes_agree_exactly(redis_client, values, offsets):
    values = [
        v.astimezone(datetime.timezone(datetime.timedelta(minutes=m)))
        for v, m in zip(values, offsets, strict=False)
    ]
    calls = [
        {"model": "g", "filters": {"id": 1}, "greatest": {"hi": v}, "least": {"lo": v}}
        for v in values
    ]
    agree(calls, redis_client)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (1, "1"),
        (1.5, datetime.date(2024, 1, 1)),
        (datetime.date(2024, 1, 1), datetime.datetime(2024, 1, 1, tzinfo=UTC)),
        (b"x", "x"),
    ],
    ids=repr,
)
def test_values_python_cannot_compare_are_refused_alike(redis_client, first, second):
    calls = [
        {"model": "g", "filters": {"id": 1}, "greatest": {"hi": first}},
        {"model": "g", "filters": {"id": 1}, "greatest": {"hi": second}},
    ]
    refused, _ = agree(calls, redis_client)
    assert refused == [None, "greatest['hi']"]


@pytest.mark.parametrize(
    ("first", "second", "held", "given"),
    [
        (1, "1", "int, float or Decimal", "str"),
        (
            datetime.date(2024, 1, 1),
            datetime.datetime(2024, 1, 1, tzinfo=UTC),
            "datetime.date",
            "datetime.datetime",
        ),
        (b"x", "x", "bytes", "str"),
    ],
    ids=repr,
)
def test_a_refused_comparison_names_both_types_on_redis(redis_client, first, second, held, given):
    # As memory's refusal does: the field, the type given and the type buffered.
    buf = make("redis", Recorder(), redis_client)
    try:
        buf.incr("g", {}, {"id": 1}, least={"lo": first})
        with pytest.raises(InvalidUpdateError) as info:
            buf.incr("g", {}, {"id": 1}, least={"lo": second})
    finally:
        buf.close()
    err = info.value
    assert (err.field, err.expected, err.got) == ("least['lo']", held, given)
    assert f"least['lo']: cannot compare {given} with the buffered {held};" in str(err)


class _FoldZone(datetime.tzinfo):
    """A zone at a DST end: the first pass of a wall-clock hour (fold=0) is +02:00, the second
    (fold=1) +01:00, as ``ZoneInfo("Europe/Paris")`` at 02:00-03:00 on 2021-10-31."""

    def utcoffset(self, dt):
        return datetime.timedelta(hours=1 if dt.fold else 2)

    def dst(self, dt):
        return datetime.timedelta(hours=0 if dt.fold else 1)

    def tzname(self, dt):
        return "CET" if dt.fold else "CEST"


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-window"])
def test_datetimes_of_one_zone_across_a_dst_change_compare_as_instants(redis_client, kind):
    # Python compares two datetimes sharing a tzinfo by wall clock: 02:59 (00:59Z) > 02:01
    # fold=1 (01:01Z). last_seen must not go back an hour: every backend compares instants.
    zone = _FoldZone()
    early = datetime.datetime(2021, 10, 31, 2, 59, tzinfo=zone)
    late = datetime.datetime(2021, 10, 31, 2, 1, fold=1, tzinfo=zone)
    assert early.astimezone(UTC) < late.astimezone(UTC) and early > late
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    try:
        buf.incr("g", {}, {"id": 1}, greatest={"last": early}, least={"first": late})
        buf.incr("g", {}, {"id": 1}, greatest={"last": late}, least={"first": early})
        buf.drain()
    finally:
        buf.close()
    [update] = rec.updates()
    # (astimezone on both sides: PEP 495 makes a fold-dependent datetime unequal to any other
    # zone's.)
    assert update.greatest["last"].astimezone(UTC) == late.astimezone(UTC)
    assert update.least["first"].astimezone(UTC) == early.astimezone(UTC)


# -- strings that cannot be encoded ------------------------------------------------------------

BAD = "bad\ud800"
UNENCODABLE = [
    ("model", {"model": BAD}, "model"),
    ("filter-name", {"filters": {BAD: 1}}, "filters key"),
    ("filter-value", {"filters": {"id": BAD}}, "filters['id']"),
    ("filter-value-2", {"filters": {"id": 1, "k": BAD}}, "filters['k']"),
    ("column-name", {"columns": {BAD: 1}}, "columns key"),
    ("extra-name", {"extra": {BAD: 1}}, "extra key"),
    ("extra-value", {"extra": {"m": BAD}}, "extra['m']"),
    ("greatest-value", {"greatest": {"m": BAD}}, "greatest['m']"),
    ("least-name", {"least": {BAD: 1}}, "least key"),
]


@pytest.mark.parametrize("kind", ["memory", "direct", "redis", "redis-window"])
@pytest.mark.parametrize(("case", "change", "field"), UNENCODABLE, ids=[c[0] for c in UNENCODABLE])
def test_a_string_utf8_cannot_encode_is_refused_at_incr(redis_client, kind, case, change, field):
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    # An existing row with the same filters first, so memory's incr fast path is the one asked.
    buf.incr("g", {"n": 1}, {"id": 1})
    call = {"model": "g", "columns": {"n": 1}, "filters": {"id": 1}, **change}
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr(**call)
    assert info.value.field == field
    assert info.value.got == "str"
    buf.drain()
    buf.close()
    assert [(u.columns, u.count) for u in rec.updates()] == [({"n": 1}, 1)]


# -- one operation per column ------------------------------------------------------------------

CONFLICTS = [
    ({"columns": {"n": 1}, "greatest": {"n": 5}}, "greatest['n']", "columns and greatest"),
    ({"columns": {"n": 1}, "extra": {"n": 5}}, "extra['n']", "columns and extra"),
    ({"extra": {"n": 1}, "least": {"n": 5}}, "least['n']", "extra and least"),
    ({"greatest": {"n": 1}, "least": {"n": 5}}, "least['n']", "greatest and least"),
]


@pytest.mark.parametrize("kind", ["memory", "direct", "redis", "redis-window"])
@pytest.mark.parametrize(("ops", "field", "got"), CONFLICTS, ids=[c[2] for c in CONFLICTS])
@pytest.mark.parametrize("pending", [False, True], ids=["new-row", "pending-row"])
def test_a_column_in_two_operations_of_one_incr_is_refused(
    redis_client, kind, ops, field, got, pending
):
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    if pending:
        buf.incr("g", {"z": 1}, {"id": 1})
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("g", filters={"id": 1}, **ops)
    assert info.value.field == field
    assert info.value.got == got
    assert "'n'" in str(info.value)
    buf.drain()
    buf.close()
    assert [(u.columns, u.count) for u in rec.updates()] == ([({"z": 1}, 1)] if pending else [])


@pytest.mark.parametrize("kind", ["memory", "redis"])
@pytest.mark.parametrize("ops", [c[0] for c in CONFLICTS], ids=[c[2] for c in CONFLICTS])
@pytest.mark.parametrize("reverse", [False, True])
def test_a_column_in_two_operations_of_two_incrs_is_refused_at_the_second(
    redis_client, kind, ops, reverse
):
    (first_op, first), (second_op, second) = sorted(ops.items(), reverse=reverse)
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    buf.incr("g", filters={"id": 1}, **{first_op: first})
    with pytest.raises(InvalidUpdateError) as info:
        # An int column second: the incr fast path of both backends.
        buf.incr("g", filters={"id": 1}, **{second_op: second})
    assert info.value.field == f"{second_op}['n']"
    assert info.value.got == f"{first_op} and {second_op}"
    buf.drain()
    buf.close()
    assert [(u.count, u.columns, u.extra) for u in rec.updates()] == [
        (1, first if first_op == "columns" else {}, first if first_op == "extra" else {})
    ]


@pytest.mark.parametrize("kind", ["memory", "direct", "redis", "redis-window"])
@pytest.mark.parametrize("what", ["columns", "extra", "greatest", "least"])
def test_an_operation_on_a_filter_column_is_refused(redis_client, kind, what):
    rec = Recorder()
    buf = make(kind, rec, redis_client)
    buf.incr("g", {"n": 1}, {"id": 1})
    # The fast paths first: one int column, one filter, the row already pending.
    with pytest.raises(InvalidUpdateError) as info:
        buf.incr("g", filters={"id": 1}, **{what: {"id": 2}})
    assert info.value.field == f"{what}['id']"
    assert info.value.got == f"filters and {what}"
    buf.drain()
    buf.close()
    assert [(u.columns, u.count) for u in rec.updates()] == [({"n": 1}, 1)]
