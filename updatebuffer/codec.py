"""Canonical, typed, self-delimiting encoding of values.

Every value is written as ``tag`` (one ASCII byte) + ``length`` (unsigned LEB128) + ``payload``,
so concatenations decode unambiguously and the encoding is injective: ``1``, ``"1"``, ``1.0``,
``True`` and ``Decimal("1")`` all encode differently. Decoding is a table lookup on the tag and a
constructor call on the payload; it never imports, evaluates or unpickles anything, so data read
back from a shared store cannot execute code.

The byte layout is frozen per :data:`CODEC_VERSION`; golden vectors in the tests pin it, because
changing it would orphan rows already buffered in Redis.
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
import struct
import uuid
from typing import TYPE_CHECKING

from updatebuffer.errors import InvalidUpdateError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from updatebuffer._types import Value

__all__ = [
    "CODEC_VERSION",
    "SUPPORTED_TYPES",
    "check_value",
    "decode_value",
    "decode_values",
    "encode_value",
    "type_name",
]

#: Version of the byte layout; part of every Redis key name.
CODEC_VERSION = 1

#: Human-readable list of accepted value types, used in error messages.
SUPPORTED_TYPES = (
    "None, bool, int, float (finite), str, bytes, decimal.Decimal (finite), "
    "datetime.datetime (timezone-aware), datetime.date, uuid.UUID"
)

_DOUBLE = struct.Struct(">d")


def type_name(value: object) -> str:
    """Return the qualified type name of *value* for error messages."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _reject(field: str, value: object, reason: str = "") -> InvalidUpdateError:
    got = type_name(value)
    detail = f" ({reason})" if reason else ""
    return InvalidUpdateError(
        f"{field}: unsupported value of type {got}{detail}; supported: {SUPPORTED_TYPES}",
        field=field,
        expected=SUPPORTED_TYPES,
        got=got,
    )


def _payload(value: object, field: str) -> tuple[bytes, bytes]:
    # Order matters: bool before int (bool is an int), datetime before date (likewise).
    if value is None:
        return b"N", b""
    if isinstance(value, bool):
        return (b"T" if value else b"F"), b""
    if isinstance(value, int):
        return b"i", _int_text(int(value)).encode("ascii")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _reject(field, value, f"{value!r} is not finite")
        return b"f", _DOUBLE.pack(value)
    if isinstance(value, str):
        try:
            return b"s", str.encode(value, "utf-8")
        except UnicodeEncodeError as exc:
            # A lone surrogate: no Redis client or database can take it, so refuse it at incr.
            raise _reject(
                field, value, f"a lone surrogate at index {exc.start} cannot be encoded as UTF-8"
            ) from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"b", bytes(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _reject(field, value, f"{value!r} is not finite")
        # str() of a finite Decimal is exact and keeps the exponent (1.0 != 1.00 as rows).
        return b"D", str(value).encode("ascii")
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise _reject(field, value, "naive datetime; attach a timezone, e.g. tz=UTC")
        return b"t", value.isoformat().encode("ascii")
    if isinstance(value, datetime.date):
        return b"d", value.isoformat().encode("ascii")
    if isinstance(value, uuid.UUID):
        return b"u", value.bytes
    raise _reject(field, value)


def _int_text(n: int) -> str:
    try:
        return str(n)
    except ValueError:
        # Beyond sys.get_int_max_str_digits(); Decimal converts exactly, with the same digits.
        return str(decimal.Decimal(n))


def _uleb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_value(value: object, field: str = "value") -> bytes:
    """Encode one value canonically.

    :param value: a value of one of the supported types (:data:`SUPPORTED_TYPES`).
    :param field: the field name used in the error message.
    :raises InvalidUpdateError: the type is unsupported, a float or Decimal is not finite, or a
        datetime is naive.
    """
    tag, payload = _payload(value, field)
    return tag + _uleb128(len(payload)) + payload


def check_value(value: object, field: str) -> None:
    """Raise :class:`InvalidUpdateError` naming *field* unless *value* is encodable."""
    _payload(value, field)


_INT_TEXT = re.compile(r"-?[0-9]+")


def _decode_int(raw: bytes) -> int:
    text = raw.decode("ascii")
    try:
        return int(text)
    except ValueError:
        if not _INT_TEXT.fullmatch(text):
            raise
        # Beyond sys.get_int_max_str_digits(): an encoded arbitrary-size filter int.
        return int(decimal.Decimal(text))


# Decoders refuse what encode_value refuses (NaN, infinities, naive datetimes): such bytes
# were not written by this codec, so they are corrupt.
def _decode_float(raw: bytes) -> float:
    value: float = _DOUBLE.unpack(raw)[0]
    if not math.isfinite(value):
        raise ValueError(f"non-finite float {value!r}")
    return value


def _decode_decimal(raw: bytes) -> decimal.Decimal:
    value = decimal.Decimal(raw.decode("ascii"))
    if not value.is_finite():
        raise ValueError(f"non-finite Decimal {value!r}")
    return value


# isoformat() writes a sub-second UTC offset as +HH:MM:SS.ffffff; CPython's fromisoformat()
# drops it to UTC when HH:MM:SS is 00:00:00, so such an offset is rebuilt here.
_FRACTIONAL_OFFSET = re.compile(r"([+-])00:00:00\.([0-9]{6})\Z")


def _decode_datetime(raw: bytes) -> datetime.datetime:
    text = raw.decode("ascii")
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    tiny = _FRACTIONAL_OFFSET.search(text)
    if tiny is not None:
        offset = datetime.timedelta(microseconds=int(tiny.group(2)))
        value = value.replace(tzinfo=datetime.timezone(-offset if tiny.group(1) == "-" else offset))
    return value


_DECODERS: dict[bytes, Callable[[bytes], Value]] = {
    b"N": lambda raw: None,
    b"T": lambda raw: True,
    b"F": lambda raw: False,
    b"i": _decode_int,
    b"f": _decode_float,
    b"s": lambda raw: raw.decode("utf-8", "surrogatepass"),
    b"b": bytes,
    b"D": _decode_decimal,
    b"t": _decode_datetime,
    b"d": lambda raw: datetime.date.fromisoformat(raw.decode("ascii")),
    b"u": lambda raw: uuid.UUID(bytes=raw),
}


_STR_TAG, _INT_TAG = ord("s"), ord("i")


def _decode_span(data: bytes, pos: int, limit: int) -> tuple[list[Value], int]:
    """Decode up to *limit* values (``-1``: to the end) from *pos*; return them and the end.

    One loop with inline branches for the common tags (``s``, ``i``) and one-byte lengths: row
    keys are decoded once per flushed row, so this is on the drain's hot path.
    """
    values: list[Value] = []
    size = len(data)
    try:
        while pos < size and limit != 0:
            limit -= 1
            tag = data[pos]
            length = data[pos + 1]
            pos += 2
            if length & 0x80:  # a multi-byte ULEB128 length
                length &= 0x7F
                shift = 7
                while True:
                    byte = data[pos]
                    pos += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
            end = pos + length
            if end > size:
                raise ValueError("truncated payload")
            if tag == _STR_TAG:
                values.append(data[pos:end].decode("utf-8", "surrogatepass"))
            elif tag == _INT_TAG:
                values.append(_decode_int(data[pos:end]))
            else:
                values.append(_DECODERS[bytes((tag,))](data[pos:end]))
            pos = end
    except (
        IndexError,
        KeyError,
        ValueError,
        UnicodeDecodeError,
        struct.error,
        decimal.InvalidOperation,  # an ArithmeticError, not a ValueError
    ) as exc:
        raise ValueError(f"corrupt encoded value at offset {pos}: {exc!r}") from exc
    return values, pos


def decode_value(data: bytes) -> Value:
    """Decode bytes produced by :func:`encode_value`.

    :raises ValueError: the bytes are not exactly one encoded value.
    """
    values, end = _decode_span(data, 0, 1)
    if not values:
        raise ValueError("corrupt encoded value at offset 0: no value")
    if end != len(data):
        raise ValueError(f"trailing bytes after encoded value at offset {end}")
    return values[0]


def decode_values(data: bytes, start: int = 0) -> Iterator[Value]:
    """Decode a concatenation of encoded values, from offset *start* to the end.

    :raises ValueError: the bytes are corrupt (raised by this call: decoding is eager).
    """
    return iter(_decode_span(data, start, -1)[0])
