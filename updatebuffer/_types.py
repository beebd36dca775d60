"""Type aliases shared across the package."""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Mapping
from typing import TypeAlias

__all__ = ["Number", "Value", "ValueMap"]

#: A value the codec can store: for filters and for ``extra``/``greatest``/``least``.
Value: TypeAlias = (
    bool
    | int
    | float
    | str
    | bytes
    | decimal.Decimal
    | datetime.datetime
    | datetime.date
    | uuid.UUID
    | None
)

#: A column delta.
Number: TypeAlias = int | float

#: A mapping of field name to codec value.
ValueMap: TypeAlias = Mapping[str, Value]
