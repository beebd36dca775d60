from __future__ import annotations

import builtins
import datetime
import decimal
import pickle
import sys
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from updatebuffer.codec import check_value, decode_value, decode_values, encode_value
from updatebuffer.errors import InvalidUpdateError, UpdateBufferError

IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))

# Pinned byte layout (CODEC_VERSION 1): tag byte, LEB128 payload length, payload. Changing any of
# these orphans rows already buffered in Redis: bump the version instead.
GOLDEN = [
    (None, b"N\x00"),
    (True, b"T\x00"),
    (False, b"F\x00"),
    (0, b"i\x010"),
    (-1, b"i\x02-1"),
    (2**70, b"i\x161180591620717411303424"),
    (1.5, b"f\x08\x3f\xf8\x00\x00\x00\x00\x00\x00"),
    (-0.0, b"f\x08\x80\x00\x00\x00\x00\x00\x00\x00"),
    ("", b"s\x00"),
    ("héllo", b"s\x06h\xc3\xa9llo"),
    (b"\x00\xff", b"b\x02\x00\xff"),
    (decimal.Decimal("1.10"), b"D\x041.10"),
    (
        datetime.datetime(2024, 3, 5, 14, 7, 9, 123456, tzinfo=IST),
        b"t\x202024-03-05T14:07:09.123456+05:30",
    ),
    (datetime.date(2024, 2, 29), b"d\x0a2024-02-29"),
    (
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        b"u\x10\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78\x12\x34\x56\x78",
    ),
]


def typed(value):
    """A key equal exactly when two values are the same type and the same value.

    ``repr`` tells -0.0 from 0.0, Decimal("1.0") from Decimal("1.00") and two offsets of one
    instant; ``fold`` is dropped because it means nothing for a fixed-offset datetime and the
    encoding (ISO 8601) does not carry it.
    """
    if isinstance(value, datetime.datetime):
        value = value.replace(fold=0)
    return (type(value), repr(value))


fixed_offsets = st.builds(
    datetime.timezone,
    st.timedeltas(
        min_value=-datetime.timedelta(hours=23, minutes=59, seconds=59),
        max_value=datetime.timedelta(hours=23, minutes=59, seconds=59),
    ),
)

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
    # Every code point UTF-8 can encode (lone surrogates are refused: see below).
    st.text(st.characters(exclude_categories=("Cs",))),
    st.binary(),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=fixed_offsets),
    st.dates(),
    st.uuids(),
)


# -- golden vectors and round trips ------------------------------------------------------------


@pytest.mark.parametrize(("value", "encoded"), GOLDEN, ids=[repr(v) for v, _ in GOLDEN])
def test_golden_vector(value, encoded):
    assert encode_value(value) == encoded


@pytest.mark.parametrize(("value", "encoded"), GOLDEN, ids=[repr(v) for v, _ in GOLDEN])
def test_golden_vector_decodes(value, encoded):
    decoded = decode_value(encoded)
    assert typed(decoded) == typed(value)
    assert decoded == value


def test_datetime_round_trip_keeps_the_offset_and_microseconds():
    value = datetime.datetime(2024, 3, 5, 14, 7, 9, 123456, tzinfo=IST)
    decoded = decode_value(encode_value(value))
    assert isinstance(decoded, datetime.datetime)
    assert decoded.utcoffset() == datetime.timedelta(hours=5, minutes=30)
    assert decoded.microsecond == 123456
    assert decoded == value


def test_subclasses_encode_as_their_base_type():
    class Color(int):
        pass

    assert encode_value(Color(3)) == encode_value(3)
    assert encode_value(bytearray(b"\x00\xff")) == encode_value(b"\x00\xff")
    assert encode_value(memoryview(b"\x00\xff")) == encode_value(b"\x00\xff")
    assert type(decode_value(encode_value(bytearray(b"x")))) is bytes


def test_arbitrary_size_int_round_trips_beyond_the_str_conversion_limit():
    big = -(10**5000) - 7
    encoded = encode_value(big)
    assert encoded[:1] == b"i"
    assert encoded.endswith(b"-1" + b"0" * 4996 + b"0007")
    assert decode_value(encoded) == big
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        # A host may lower the limit; the layout and the round trip must not change.
        assert encode_value(big) == encoded
        assert decode_value(encoded) == big
    finally:
        sys.set_int_max_str_digits(old)


@given(values)
@settings(max_examples=200)
@example(-0.0)
@example(decimal.Decimal("1.0"))
@example(decimal.Decimal("-0E+3"))
@example("\U0001f600")
@example(datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=23))))
@example(
    datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(microseconds=1)))
)
@example(
    datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone(-datetime.timedelta(microseconds=5)))
)
def test_round_trip_preserves_type_and_value(value):
    assert typed(decode_value(encode_value(value))) == typed(value)


@given(st.datetimes(timezones=st.timezones()))
@settings(max_examples=200)
def test_round_trip_of_zoneinfo_datetimes_keeps_wall_time_and_offset(value):
    # The zone becomes a fixed offset; wall time and offset (hence the instant) are kept. `==`
    # is not used: Python compares a fold- or gap-ambiguous zoneinfo time unequal to any other
    # zone's.
    decoded = decode_value(encode_value(value))
    assert type(decoded) is datetime.datetime
    assert decoded.utcoffset() == value.utcoffset()
    assert decoded.replace(tzinfo=None) == value.replace(tzinfo=None, fold=0)


@given(st.lists(values, min_size=2, max_size=8, unique_by=typed))
@settings(max_examples=200)
@example([1, "1", 1.0, True, decimal.Decimal("1"), b"1"])
@example([0.0, -0.0, 0, False, None, "", b"", decimal.Decimal("0")])
@example([decimal.Decimal("1.0"), decimal.Decimal("1.00"), decimal.Decimal("1")])
@example(
    [
        datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.timezone.utc),
        datetime.datetime(2024, 1, 1, 17, 30, tzinfo=IST),
        datetime.date(2024, 1, 1),
    ]
)
def test_distinct_typed_values_encode_differently(items):
    encoded = [encode_value(v) for v in items]
    assert len(set(encoded)) == len(items)


@given(st.lists(values, max_size=10))
@settings(max_examples=200)
def test_concatenation_decodes_into_the_values(items):
    data = b"".join(encode_value(v) for v in items)
    assert [typed(v) for v in decode_values(data)] == [typed(v) for v in items]


def test_decode_values_from_an_offset():
    data = b"xyz" + encode_value(1) + encode_value("a")
    assert list(decode_values(data, 3)) == [1, "a"]


# -- rejections --------------------------------------------------------------------------------

REJECTED = [
    (datetime.datetime(2024, 1, 1, 12, 0), "datetime.datetime"),
    (float("nan"), "float"),
    (float("inf"), "float"),
    (float("-inf"), "float"),
    (decimal.Decimal("NaN"), "decimal.Decimal"),
    (decimal.Decimal("sNaN"), "decimal.Decimal"),
    (decimal.Decimal("Infinity"), "decimal.Decimal"),
    (object(), "object"),
    ([1], "list"),
    ({"a": 1}, "dict"),
    ({1}, "set"),
    (frozenset({1}), "frozenset"),
    ((1,), "tuple"),
    (1j, "complex"),
    (datetime.time(12, 0), "datetime.time"),
    (datetime.timedelta(1), "datetime.timedelta"),
]


@pytest.mark.parametrize(("value", "type_name"), REJECTED, ids=[t for _, t in REJECTED])
def test_unsupported_values_are_rejected_naming_field_and_type(value, type_name):
    with pytest.raises(InvalidUpdateError) as info:
        encode_value(value, "filters['project']")
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, UpdateBufferError)
    assert "filters['project']" in str(err)
    assert type_name in str(err)
    assert err.field == "filters['project']"
    assert err.got == type_name


@pytest.mark.parametrize(("value", "type_name"), REJECTED, ids=[t for _, t in REJECTED])
def test_check_value_rejects_like_encode(value, type_name):
    with pytest.raises(InvalidUpdateError, match=type_name):
        check_value(value, "extra['x']")


def test_naive_datetime_message_says_what_to_do():
    with pytest.raises(InvalidUpdateError, match="timezone"):
        encode_value(datetime.datetime(2024, 1, 1), "greatest['last_seen']")


# -- corrupt input -----------------------------------------------------------------------------

NAN = b"\x7f\xf8\x00\x00\x00\x00\x00\x00"
CORRUPT = [
    b"",
    b"N",  # no length
    b"i\x80",  # unterminated length
    b"i\x05123",  # truncated payload
    b"Z\x00",  # unknown tag
    b"N\x00\x00",  # trailing bytes
    b"i\x03abc",
    b"i\x02\xff\xfe",
    b"f\x04\x00\x00\x00\x00",  # wrong float width
    b"f\x08" + NAN,  # NaN was never encoded
    b"f\x08\x7f\xf0\x00\x00\x00\x00\x00\x00",  # inf neither
    b"s\x01\xff",
    b"D\x03abc",
    b"D\x03NaN",
    b"D\x08Infinity",
    b"t\x03abc",
    b"t\x0a2024-01-01",  # a naive datetime was never encoded
    b"d\x0a2024-02-30",
    b"u\x01a",
    b"u\x11" + bytes(17),
]


@pytest.mark.parametrize("data", CORRUPT, ids=repr)
def test_corrupt_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match=r"corrupt|trailing"):
        decode_value(data)


def test_corrupt_concatenation_raises_value_error():
    data = encode_value(1) + b"D\x03abc"
    with pytest.raises(ValueError, match="corrupt"):
        list(decode_values(data))


def _forbid(*_args, **_kwargs):
    raise AssertionError("decoding must not import, evaluate or unpickle anything")


TAGS = st.sampled_from([b"N", b"T", b"F", b"i", b"f", b"s", b"b", b"D", b"t", b"d", b"u"])


@st.composite
def tagged_payloads(draw):
    # Well-framed bytes with a real tag, so every decoder sees hostile payloads.
    tag = draw(TAGS)
    payload = draw(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
    assert len(payload) < 128
    return tag + bytes([len(payload)]) + payload


@given(st.binary(max_size=64) | tagged_payloads())
@settings(max_examples=300)
@example(b"t\x0a2024-01-01")
@example(b"D\x03NaN")
@example(b"i\x04 1_0")
def test_decoding_arbitrary_bytes_returns_a_supported_value_or_raises_value_error(data):
    saved = (builtins.__import__, builtins.eval, builtins.exec, pickle.loads, pickle.load)
    builtins.__import__ = builtins.eval = builtins.exec = _forbid
    pickle.loads = pickle.load = _forbid
    try:
        try:
            value = decode_value(data)
        except ValueError:
            return
    finally:
        builtins.__import__, builtins.eval, builtins.exec, pickle.loads, pickle.load = saved
    # Whatever decodes is a value the codec itself would write.
    check_value(value, "decoded")
    assert decode_value(encode_value(value)) == value


@pytest.mark.parametrize("text", ["bad\ud800", "\udfff", "ok\udc80ok", "\ud83d\ude00"], ids=ascii)
def test_a_lone_surrogate_is_refused_naming_the_field(text):
    with pytest.raises(InvalidUpdateError, match=r"extra\['m'\].*surrogate") as info:
        encode_value(text, "extra['m']")
    assert info.value.field == "extra['m']"
    assert info.value.got == "str"
