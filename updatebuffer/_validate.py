"""Validation shared by every backend: reject bad input at ``incr`` time, naming the field."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from updatebuffer.codec import check_value, decode_value, encode_value, type_name
from updatebuffer.errors import InvalidUpdateError
from updatebuffer.keys import check_name
from updatebuffer.update import as_instants

if TYPE_CHECKING:
    from updatebuffer._types import Number, Value

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "Operations",
    "check_columns",
    "check_one_operation",
    "check_operations",
    "check_ordered",
    "check_sum",
    "check_values",
    "conflicting_operations",
    "ordered_pick",
    "plain_filters",
    "require_filters",
    "row_identity",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Exact types whose Python equality matches codec equality, so they can be used as dict-key parts
# as they are; everything else is keyed by its canonical encoding (see row_identity).
_FAST_TAGS: dict[type, str] = {
    int: "i",
    str: "s",
    bool: "b",
    type(None): "N",
    bytes: "y",
    uuid.UUID: "u",
    datetime.date: "d",
}
_ORDERED = (int, float, decimal.Decimal, str, bytes, datetime.date, uuid.UUID)
# The types the codec decodes to. A value of another accepted type (IntEnum, a str enum,
# bytearray, a Decimal subclass) is kept as the base type the codec gives back, as the Redis
# backend delivers it; a bytearray the caller changes after incr cannot change what is buffered.
_PLAIN = frozenset({*_FAST_TAGS, float, decimal.Decimal, datetime.datetime})


def _bad_mapping(what: str, value: object) -> InvalidUpdateError:
    got = type_name(value)
    return InvalidUpdateError(
        f"{what} must be a mapping of column name to value, got {got}",
        field=what,
        expected="Mapping[str, ...]",
        got=got,
    )


def _filter_part(name: str, value: object) -> tuple[str, str, Any]:
    tag = _FAST_TAGS.get(type(value))
    # A non-ASCII str goes through the codec, which refuses what UTF-8 cannot encode.
    if tag is not None and (tag != "s" or value.isascii()):  # type: ignore[attr-defined]  # a str
        return (name, tag, value)
    encoded = encode_value(value, f"filters[{name!r}]")
    # Subclasses (IntEnum, bytearray, str enums) collapse to their base type, like the codec.
    base = decode_value(encoded)
    tag = _FAST_TAGS.get(type(base))
    if tag is not None:
        return (name, tag, base)
    return (name, "~", encoded)


def row_identity(model: object, filters: object) -> Hashable:
    """Return a hashable identity of ``(model, filters)``, cheaper than the canonical bytes.

    Two identities are equal exactly when the rows' canonical encodings
    (:func:`updatebuffer.keys.encode_row`) are equal; common value types skip the encoding.

    :raises InvalidUpdateError: the model, a filter name or a filter value is invalid.
    """
    if type(model) is not str or not model or not model.isascii():
        check_name(model, "model")
    if not isinstance(filters, Mapping):
        raise _bad_mapping("filters", filters)
    if len(filters) == 1:
        for name, value in filters.items():
            if type(name) is not str or not name or not name.isascii():
                check_name(name, "filters key")
            return (model, _filter_part(name, value))
    for name in filters:
        if type(name) is not str or not name or not name.isascii():
            check_name(name, "filters key")
    return (model, *[_filter_part(name, filters[name]) for name in sorted(filters)])


def plain_filters(filters: Mapping[str, Value]) -> dict[str, Value]:
    """Return a copy of checked *filters* with every value of a subclass type as its base type.

    ``IntEnum.A`` becomes ``1`` and ``bytearray(b"x")`` becomes ``b"x"``, as the codec decodes
    them, and a ``str`` enum name a plain ``str``, so every backend hands the callback the same
    types.
    """
    out = dict(filters)
    for name, value in out.items():
        if type(value) not in _PLAIN or type(name) is not str:
            return {
                check_name(k, "filters key"): v
                if type(v) in _PLAIN
                else decode_value(encode_value(v, f"filters[{k!r}]"))
                for k, v in filters.items()
            }
    return out


def check_columns(columns: object) -> dict[str, Number]:
    """Return a copy of *columns* after checking names and deltas.

    Deltas are ``int`` (within signed 64-bit) or finite ``float``; ``bool`` is refused because
    ``True`` as a delta is almost always a bug.

    :raises InvalidUpdateError: naming the column and the type.
    """
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise _bad_mapping("columns", columns)
    out: dict[str, Number] = {}
    for name, delta in columns.items():
        if type(name) is not str or not name or not name.isascii():
            name = check_name(name, "columns key")
        kind = type(delta)
        if kind is int:
            if not INT64_MIN <= delta <= INT64_MAX:
                raise InvalidUpdateError(
                    f"columns[{name!r}]: int delta {delta} is outside the signed 64-bit range",
                    field=f"columns[{name!r}]",
                    expected="int in [-2**63, 2**63-1]",
                    got="int",
                )
        elif kind is float:
            if not math.isfinite(delta):
                raise InvalidUpdateError(
                    f"columns[{name!r}]: float delta {delta!r} is not finite",
                    field=f"columns[{name!r}]",
                    expected="finite float",
                    got="float",
                )
        elif isinstance(delta, (int, float)) and not isinstance(delta, bool):
            # int/float subclasses (IntEnum, ...) are stored as their base type.
            base = int(delta) if isinstance(delta, int) else float(delta)
            out.update(check_columns({name: base}))
            continue
        else:
            got = type_name(delta)
            hint = (
                "; convert it with float() or int()"
                if isinstance(delta, (decimal.Decimal, str))
                else "; a bool is refused because True as a delta is almost always a bug"
                if isinstance(delta, bool)
                else ""
            )
            raise InvalidUpdateError(
                f"columns[{name!r}]: delta must be an int or a finite float, got "
                f"{_short_repr(delta)} ({got}){hint}",
                field=f"columns[{name!r}]",
                expected="int or finite float",
                got=got,
            )
        out[name] = delta
    return out


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def check_sum(name: str, total: Number) -> None:
    """Raise :class:`InvalidUpdateError` if a merged sum cannot be stored.

    An int *total* must stay within signed 64-bit, a float *total* finite (``1e308 + 1e308`` is
    ``inf``, which no database column takes back as the sum of finite deltas).
    """
    if type(total) is int:
        if not INT64_MIN <= total <= INT64_MAX:
            raise InvalidUpdateError(
                f"columns[{name!r}]: the buffered int sum would overflow signed 64-bit "
                f"({total}); the update was not stored",
                field=f"columns[{name!r}]",
                expected="sum in [-2**63, 2**63-1]",
                got="int",
            )
    elif not math.isfinite(total):
        raise InvalidUpdateError(
            f"columns[{name!r}]: the buffered float sum would not be finite ({total!r}); "
            "the update was not stored",
            field=f"columns[{name!r}]",
            expected="finite float sum",
            got="float",
        )


def check_values(values: object, what: str) -> dict[str, Value]:
    """Return a copy of the ``extra`` mapping *values* after checking names and value types.

    :raises InvalidUpdateError: naming the field and the type.
    """
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise _bad_mapping(what, values)
    out: dict[str, Value] = {}
    for name, value in values.items():
        if type(name) is not str or not name or not name.isascii():
            name = check_name(name, f"{what} key")
        kind = type(value)
        if kind not in _FAST_TAGS or (kind is str and not value.isascii()):
            if kind in _PLAIN:
                check_value(value, f"{what}[{name!r}]")
            else:
                value = decode_value(encode_value(value, f"{what}[{name!r}]"))
        out[name] = value
    return out


def check_ordered(values: object, what: str) -> dict[str, Value]:
    """Check a ``greatest``/``least`` mapping: values must be encodable and orderable.

    ``None`` and ``bool`` are refused: "the max of nothing" and "the max of a flag" are host bugs
    more often than intent; use ``extra`` to set them.

    :raises InvalidUpdateError: naming the field and the type.
    """
    out = check_values(values, what)
    for name, value in out.items():
        if value is None or isinstance(value, bool) or not isinstance(value, _ORDERED):
            got = type_name(value)
            raise InvalidUpdateError(
                f"{what}[{name!r}]: {got} cannot be ordered; greatest/least take int, float, "
                "Decimal, str, bytes, datetime (aware), date or UUID",
                field=f"{what}[{name!r}]",
                expected="orderable value",
                got=got,
            )
    return out


def ordered_pick(what: str, name: str, old: Value, new: Value, want_greater: bool) -> bool:
    """Return whether *new* replaces *old* under ``greatest`` (or ``least``).

    :raises InvalidUpdateError: the two values cannot be compared (e.g. a str after a datetime).
    """
    old, new = as_instants(old, new)
    try:
        return bool(new > old) if want_greater else bool(new < old)  # type: ignore[operator]
    except TypeError:
        raise InvalidUpdateError(
            f"{what}[{name!r}]: cannot compare {type_name(new)} with the buffered "
            f"{type_name(old)}; a column must keep one type",
            field=f"{what}[{name!r}]",
            expected=type_name(old),
            got=type_name(new),
        ) from None


def require_filters(filters: object) -> None:
    """Raise :class:`InvalidUpdateError` if *filters* is ``None`` or an empty mapping.

    A row identified by no column would be every row of the table: almost always a bug.
    """
    if filters is None or (isinstance(filters, Mapping) and not filters):
        got = type_name(filters)
        raise InvalidUpdateError(
            f"filters must identify a row: give at least one column, e.g. {{'id': 42}}; got {got}",
            field="filters",
            expected="non-empty Mapping[str, Value]",
            got=got,
        )


class Operations(NamedTuple):
    """The checked per-column operations of one ``incr`` (fresh dicts the caller may keep)."""

    columns: dict[str, Number]
    extra: dict[str, Value]
    greatest: dict[str, Value]
    least: dict[str, Value]
    signal_only: bool


def check_operations(
    columns: object,
    extra: object,
    greatest: object,
    least: object,
    signal_only: object,
    filters: Mapping[str, object] | None = None,
    *,
    distinct: bool = True,
) -> Operations:
    """Check everything of an ``incr`` except the row identity, as every backend must.

    A column may take one operation per update: ``{"n": 1}`` with ``greatest={"n": 5}`` has no
    single meaning for the host's row (SQL writers refuse it), so it is refused here; so is an
    operation on a column that identifies the row (a name of the already checked *filters*).

    :param distinct: whether to refuse a column given two operations (or a filter's column);
        a backend that checks it as it merges passes false and calls
        :func:`check_one_operation` itself.
    :raises InvalidUpdateError: naming the field and the type, or the column and both operators.
    """
    if signal_only is not True and signal_only is not False:
        got = type_name(signal_only)
        raise InvalidUpdateError(
            f"signal_only must be a bool, got {got}", field="signal_only", expected="bool", got=got
        )
    ops = Operations(
        check_columns(columns),
        check_values(extra, "extra") if extra else {},
        check_ordered(greatest, "greatest") if greatest else {},
        check_ordered(least, "least") if least else {},
        signal_only,
    )
    if distinct:
        check_one_operation(ops, filters)
    return ops


def check_one_operation(ops: Operations, filters: Mapping[str, object] | None = None) -> None:
    """Raise :class:`InvalidUpdateError` if a column appears under two operators of *ops*.

    :param filters: the row's (checked) filters: an operation on one of them is refused too.
    """
    cols, ext, most, fewest, _ = ops
    if filters is None:
        filters = {}
    if not (ext or most or fewest):
        for name in filters:
            if name in cols:
                raise conflicting_operations(name, "filters", "columns")
        return
    # One merged dict of every name (built in C): no Python loop unless two operations share
    # a name.
    if len({**filters, **cols, **ext, **most, **fewest}) == len(filters) + len(cols) + len(
        ext
    ) + len(most) + len(fewest):
        return
    seen: dict[str, str] = {}
    for what, values in (
        ("filters", filters),
        ("columns", cols),
        ("extra", ext),
        ("greatest", most),
        ("least", fewest),
    ):
        for name in values:
            other = seen.setdefault(name, what)
            if other != what:
                raise conflicting_operations(name, other, what)


def conflicting_operations(name: str, first: str, second: str) -> InvalidUpdateError:
    """Return the error for column *name* given both *first* and *second* operations."""
    return InvalidUpdateError(
        f"{second}[{name!r}]: column {name!r} is also given in {first}; a column takes one "
        "operation per row (a sum, a last value, a greatest or a least), not two",
        field=f"{second}[{name!r}]",
        expected=f"{name!r} in only one of filters/columns/extra/greatest/least",
        got=f"{first} and {second}",
    )
