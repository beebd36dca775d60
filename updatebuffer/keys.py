"""Row identity: the canonical key of ``(model, filters)``.

The canonical bytes are ``KEY_VERSION`` (one byte), the encoded model, the number of filters,
then each filter as encoded name + encoded value, sorted by name. Every piece is a
self-delimiting :mod:`updatebuffer.codec` value, so the encoding is injective and typed: filters
``{"id": 1}`` and ``{"id": "1"}`` are different rows.

Stores that need a short name (Redis) use :func:`row_digest`, a fixed-size blake2b-128 of the
canonical bytes, and keep the canonical bytes beside the row so a flush rebuilds ``filters``
exactly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from updatebuffer.codec import _decode_span, encode_value
from updatebuffer.errors import InvalidUpdateError

if TYPE_CHECKING:
    from updatebuffer._types import Value

__all__ = [
    "KEY_VERSION",
    "RowKey",
    "check_name",
    "decode_row",
    "encode_row",
    "readable_model",
    "redis_key",
    "row_digest",
]

#: Version byte leading every canonical row encoding.
KEY_VERSION = 1

_VERSION_BYTE = bytes([KEY_VERSION])
# Readable part of a Redis key name: keep it free of ':' (our separator) and '{' / '}' (Redis
# Cluster hash-tag delimiters); uniqueness comes from the digest, not from this part.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def check_name(name: object, field: str) -> str:
    """Return *name* as a plain ``str`` if it is a non-empty ``str``; else raise.

    A ``str`` subclass (a ``str`` enum member) comes back as a plain ``str`` of the same
    characters, which is what a Redis backend delivers: its ``format()`` may differ
    (``"Col.N"``), and a host building SQL from names must get the same text on every backend.

    :raises InvalidUpdateError: *name* is not a non-empty ``str`` UTF-8 can encode.

    :param name: the model or field name to check.
    :param field: how to name it in the error (``"model"``, ``"columns key"`` ...).
    """
    if not isinstance(name, str):
        got = type(name).__qualname__
        raise InvalidUpdateError(
            f"{field} must be a non-empty str, got {got}: {name!r}",
            field=field,
            expected="non-empty str",
            got=got,
        )
    if not name:
        raise InvalidUpdateError(
            f"{field} must be a non-empty str, got ''",
            field=field,
            expected="non-empty str",
            got="str",
        )
    if not name.isascii():
        _check_encodable(name, field)
    return name if type(name) is str else str.__str__(name)


def _check_encodable(text: str, field: str) -> None:
    # A lone surrogate ("\ud800") is a valid Python str but not UTF-8: Redis clients cannot send
    # it and databases cannot store it, so it is refused here, at incr, not at push or flush.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidUpdateError(
            f"{field}: str {text!r} cannot be encoded as UTF-8 ({exc.reason} at index "
            f"{exc.start}); remove the lone surrogate or decode the text with errors='replace'",
            field=field,
            expected="str encodable as UTF-8",
            got="str",
        ) from None


@dataclass(frozen=True, slots=True)
class RowKey:
    """The identity of one row: its model and canonical bytes.

    Two ``RowKey``s are equal exactly when their ``(model, filters)`` are the same typed values.
    """

    model: str
    canonical: bytes

    @property
    def digest(self) -> str:
        """Hex blake2b-128 digest of the canonical bytes (32 characters)."""
        return row_digest(self.canonical)


def encode_row(model: str, filters: Mapping[str, Value]) -> bytes:
    """Return the canonical bytes of ``(model, filters)``.

    :raises InvalidUpdateError: the model or a filter name is not a non-empty ``str``, or a filter
        value has an unsupported type (the message names the filter and the type).
    """
    check_name(model, "model")
    if not isinstance(filters, Mapping):
        raise InvalidUpdateError(
            f"filters must be a mapping of column name to value, got {type(filters).__qualname__}",
            field="filters",
            expected="Mapping[str, Value]",
            got=type(filters).__qualname__,
        )
    parts = [_VERSION_BYTE, encode_value(model, "model"), encode_value(len(filters), "filters")]
    names = [check_name(name, "filters key") for name in filters]
    for name in sorted(names):
        parts.append(encode_value(name, "filters key"))
        parts.append(encode_value(filters[name], f"filters[{name!r}]"))
    return b"".join(parts)


def decode_row(canonical: bytes) -> tuple[str, dict[str, Value]]:
    """Rebuild ``(model, filters)`` from :func:`encode_row` output.

    :raises ValueError: the bytes are not a canonical row of a known version.
    """
    if canonical[:1] != _VERSION_BYTE:
        raise ValueError(f"unknown row key version {canonical[:1]!r}")
    # Called once per flushed row: one eager decode, then type() checks (bool is not a count).
    values = _decode_span(canonical, 1, -1)[0]
    size = len(values)
    if size < 2:
        raise ValueError("corrupt row key header")
    model, count = values[0], values[1]
    if type(model) is not str or type(count) is not int:
        raise ValueError("corrupt row key header")
    if size != 2 + 2 * count:
        raise ValueError("corrupt row key: filter count does not match")
    filters: dict[str, Value] = {}
    for i in range(2, size, 2):
        name = values[i]
        if type(name) is not str:
            raise ValueError("corrupt row key: filter name is not a str")
        filters[name] = values[i + 1]
    return model, filters


def row_digest(canonical: bytes) -> str:
    """Return the 32-character hex blake2b-128 digest of canonical row bytes."""
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def readable_model(model: str) -> str:
    """Return *model* made safe for a Redis key name (readability only; not unique)."""
    return _UNSAFE.sub("_", model)[:64]


def redis_key(prefix: str, tag: str, model: str, digest: str) -> str:
    """Return the readable Redis key name ``<prefix>:<version>:{<tag>}:<model>:<digest>``.

    *model* is sanitised for readability only (the digest already identifies the row); ``{tag}``
    is the Redis Cluster hash tag that keeps every key one script touches in one slot.
    """
    return f"{prefix}:{KEY_VERSION}:{{{tag}}}:{readable_model(model)}:{digest}"
