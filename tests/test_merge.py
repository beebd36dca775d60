from __future__ import annotations

import dataclasses
import datetime
import math
import threading
from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import updatebuffer
from updatebuffer.update import Update, _unchecked_update, merge_updates

UTC = datetime.timezone.utc
COLUMNS = ["times_seen", "bytes", "errors"]
FILTERS = {"id": 42}

aware = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1),
    max_value=datetime.datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30))]),
)
# One value family per column, as a host would use them (comparisons across families are refused
# at incr time).
ordered_columns = st.fixed_dictionaries(
    {},
    optional={
        "last_seen": aware,
        "score": st.integers(-(2**70), 2**70),
        "name": st.text(max_size=5),
        "day": st.dates(),
    },
)
extra_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), aware)


BIG_INTS = st.integers(-(2**70), 2**70)


@st.composite
def updates(draw, numbers=BIG_INTS):
    return Update(
        model="groups",
        filters=FILTERS,
        columns=draw(st.dictionaries(st.sampled_from(COLUMNS), numbers)),
        extra=draw(st.dictionaries(st.sampled_from(["message", "level", "culprit"]), extra_values)),
        greatest=draw(ordered_columns),
        least=draw(ordered_columns),
        signal_only=draw(st.booleans()),
        count=draw(st.integers(1, 1000)),
        first_buffered=draw(st.floats(0, 2e9)),
    )


def typed(value):
    return (type(value), repr(value))


def snapshot(update):
    """Everything about an update, with values compared by type and repr (not just ``==``)."""
    return (
        update.model,
        sorted((k, typed(v)) for k, v in update.filters.items()),
        sorted((k, typed(v)) for k, v in update.columns.items()),
        sorted((k, typed(v)) for k, v in update.extra.items()),
        sorted((k, typed(v)) for k, v in update.greatest.items()),
        sorted((k, typed(v)) for k, v in update.least.items()),
        update.signal_only,
        update.count,
        update.first_buffered,
    )


def expected_fold(ups):
    """The merge semantics of DESIGN 3 (1), written out over a whole list."""
    columns = {}
    extra = {}
    greatest = {}
    least = {}
    for u in ups:
        for k, v in u.columns.items():
            columns[k] = columns.get(k, 0) + v
        extra.update(u.extra)
        for k, v in u.greatest.items():
            if k not in greatest or v > greatest[k]:
                greatest[k] = v
        for k, v in u.least.items():
            if k not in least or v < least[k]:
                least[k] = v
    return Update(
        model="groups",
        filters=FILTERS,
        columns=columns,
        extra=extra,
        greatest=greatest,
        least=least,
        signal_only=all(u.signal_only for u in ups),
        count=sum(u.count for u in ups),
        first_buffered=min(u.first_buffered for u in ups),
    )


@given(updates(), updates(), updates())
@settings(max_examples=200)
def test_merge_is_associative(a, b, c):
    left = merge_updates(merge_updates(a, b), c)
    right = merge_updates(a, merge_updates(b, c))
    assert snapshot(left) == snapshot(right)


@given(st.lists(updates(), min_size=1, max_size=6))
@settings(max_examples=200)
def test_merge_folds_to_the_documented_semantics(ups):
    merged = reduce(merge_updates, ups)
    assert snapshot(merged) == snapshot(expected_fold(ups))


@given(updates(), updates())
@settings(max_examples=200)
def test_merge_of_two_per_operator(a, b):
    merged = merge_updates(a, b)
    for name in set(a.columns) | set(b.columns):
        assert merged.columns[name] == a.columns.get(name, 0) + b.columns.get(name, 0)
    for name in set(a.extra) | set(b.extra):
        expected = b.extra[name] if name in b.extra else a.extra[name]
        assert typed(merged.extra[name]) == typed(expected)
    for name in set(a.greatest) | set(b.greatest):
        candidates = [u.greatest[name] for u in (a, b) if name in u.greatest]
        assert merged.greatest[name] == max(candidates)
    for name in set(a.least) | set(b.least):
        candidates = [u.least[name] for u in (a, b) if name in u.least]
        assert merged.least[name] == min(candidates)
    assert merged.signal_only is (a.signal_only and b.signal_only)
    assert merged.count == a.count + b.count
    assert merged.first_buffered == min(a.first_buffered, b.first_buffered)
    assert merged.model == a.model
    assert merged.filters == a.filters


def test_a_real_update_wins_over_a_signal():
    signal = Update("groups", FILTERS, signal_only=True)
    real = Update("groups", FILTERS, columns={"times_seen": 1})
    assert merge_updates(signal, real).signal_only is False
    assert merge_updates(real, signal).signal_only is False
    assert merge_updates(signal, signal).signal_only is True


def test_int_and_float_deltas_merge_to_a_float():
    a = Update("groups", FILTERS, columns={"n": 1})
    b = Update("groups", FILTERS, columns={"n": 0.5})
    merged = merge_updates(a, b)
    assert merged.columns == {"n": 1.5}
    assert type(merged.columns["n"]) is float


@given(
    updates(numbers=st.floats(-1e6, 1e6)),
    updates(numbers=st.floats(-1e6, 1e6)),
    updates(numbers=st.floats(-1e6, 1e6)),
)
@settings(max_examples=200)
def test_float_columns_are_associative_within_rounding(a, b, c):
    left = merge_updates(merge_updates(a, b), c).columns
    right = merge_updates(a, merge_updates(b, c)).columns
    assert left.keys() == right.keys()
    for name in left:
        assert math.isclose(left[name], right[name], rel_tol=1e-9, abs_tol=1e-6)


# -- the memory backend is order-independent ---------------------------------------------------

ROWS = [{"id": 1}, {"id": 2}, {"id": "1"}]


@st.composite
def incr_calls(draw):
    return {
        "filters": draw(st.sampled_from(ROWS)),
        "columns": draw(
            st.dictionaries(
                st.sampled_from(COLUMNS),
                st.integers(-(2**40), 2**40) | st.floats(-1e6, 1e6),
                min_size=1,
            )
        ),
        "greatest": draw(
            st.fixed_dictionaries({}, optional={"last_seen": aware, "score": st.integers()})
        ),
        "least": draw(st.fixed_dictionaries({}, optional={"first_seen": aware})),
        "signal_only": draw(st.booleans()),
    }


def apply(calls, order):
    buf = updatebuffer.from_url("memory://?delay=3600", flush=lambda batch: None)
    for i in order:
        call = calls[i]
        buf.incr(
            "groups",
            call["columns"],
            call["filters"],
            greatest=call["greatest"] or None,
            least=call["least"] or None,
            signal_only=call["signal_only"],
        )
    result = {repr(row): buf.get("groups", row) for row in ROWS}
    assert buf.stats().updates_accepted == len(calls)
    buf.close()
    return result


@given(st.lists(incr_calls(), min_size=1, max_size=25), st.data())
@settings(max_examples=100, deadline=None)
def test_memory_merge_does_not_depend_on_arrival_order(calls, data):
    order_a = data.draw(st.permutations(range(len(calls))))
    order_b = data.draw(st.permutations(range(len(calls))))
    a = apply(calls, order_a)
    b = apply(calls, order_b)
    for row, ua in a.items():
        ub = b[row]
        assert (ua is None) is (ub is None)
        if ua is None:
            continue
        for name in ua.columns.keys() | ub.columns.keys():
            va, vb = ua.columns[name], ub.columns[name]
            assert type(va) is type(vb)
            if type(va) is int:
                assert va == vb
            else:
                assert math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-3)
        assert ua.greatest == ub.greatest
        assert ua.least == ub.least
        assert ua.signal_only is ub.signal_only
        assert ua.count == ub.count
        assert ua.filters == ub.filters


def test_concurrent_incr_from_threads_loses_nothing():
    flushed = []
    buf = updatebuffer.from_url("memory://?delay=3600", flush=flushed.extend)
    threads = 8
    per_thread = 2000
    barrier = threading.Barrier(threads)

    def work(seed):
        barrier.wait()
        for i in range(per_thread):
            row = ROWS[(seed + i) % len(ROWS)]
            buf.incr("groups", {"times_seen": 1, "bytes": i}, row, greatest={"score": i})

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    totals = {repr(row): buf.get("groups", row) for row in ROWS}
    assert sum(u.columns["times_seen"] for u in totals.values()) == threads * per_thread
    assert sum(u.columns["bytes"] for u in totals.values()) == threads * sum(range(per_thread))
    assert sum(u.count for u in totals.values()) == threads * per_thread
    assert max(u.greatest["score"] for u in totals.values()) == per_thread - 1
    assert buf.drain() == len(ROWS)
    assert sum(u.columns["times_seen"] for u in flushed) == threads * per_thread
    buf.close()


def test_unchecked_update_equals_the_dataclass_constructor():
    values = {
        "model": "g",
        "filters": {"id": 1},
        "columns": {"n": 2},
        "extra": {"e": "x"},
        "greatest": {"t": 3},
        "least": {"t": 1},
        "signal_only": True,
        "count": 4,
        "first_buffered": 1.5,
    }
    # Same field names, same order: a field added to Update must be added to the fast builder.
    assert list(values) == [f.name for f in dataclasses.fields(Update)]
    fast = _unchecked_update(*values.values())
    assert fast == Update(**values) and repr(fast) == repr(Update(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.count = 5  # type: ignore[misc]  # still frozen


def test_merge_keeps_the_sign_of_a_zero_sum():
    # A column only the later update has is that update's value: 0 + -0.0 would be 0.0.
    a = Update(model="g", filters={"id": 1}, columns={}, count=1, first_buffered=1.0)
    b = Update(model="g", filters={"id": 1}, columns={"x": -0.0}, count=1, first_buffered=2.0)
    merged = merge_updates(a, b)
    assert merged.columns["x"].hex() == (-0.0).hex()
