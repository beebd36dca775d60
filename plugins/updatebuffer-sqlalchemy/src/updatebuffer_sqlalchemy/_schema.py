"""Resolve ``tables={model: Table | ORM class}`` and check updates against it, before any write."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Mapper
from updatebuffer import ConfigurationError

from updatebuffer_sqlalchemy._errors import UnwritableUpdateError

if TYPE_CHECKING:
    from updatebuffer import Update, Value

__all__ = [
    "Checker",
    "Model",
    "Signature",
    "check_update",
    "resolve_tables",
    "signature",
    "sort_key",
    "sort_rows",
]

#: ``(filters as (name, is None), columns, extra, greatest, least)``: rows with one signature can
#: share one statement.
Signature: TypeAlias = tuple[
    tuple[tuple[str, bool], ...],
    tuple[str, ...],
    tuple[str, ...],
    tuple[str, ...],
    tuple[str, ...],
]

_OPS = ("filters", "columns", "extra", "greatest", "least")
_SHOWN = 20  # column names listed in an error message
_SHAPES_KEPT = 10_000  # bound on remembered update shapes (they are few in practice)


@dataclass(frozen=True)
class Model:
    """One mapped model: its table, its field-name-to-column map and its unique keys."""

    name: str
    table: sa.Table
    columns: Mapping[str, sa.Column[Any]]
    unique_keys: frozenset[frozenset[str]]
    #: Fields that lead some index (so a lookup by them is an index scan).
    index_leads: frozenset[str] = frozenset()


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _resolve(model: object, target: object) -> Model:
    if not isinstance(model, str) or not model:
        raise ConfigurationError(
            f"tables keys must be non-empty model names (str), got {model!r}", option="tables"
        )
    if isinstance(target, sa.Table):
        table = target
        columns: dict[str, sa.Column[Any]] = {c.key: c for c in table.columns}
    else:
        try:
            mapper = sa.inspect(target)
        except sa_exc.NoInspectionAvailable:
            mapper = None
        if not isinstance(mapper, Mapper) or not isinstance(mapper.local_table, sa.Table):
            raise ConfigurationError(
                f"tables[{model!r}] must be a sqlalchemy Table or a mapped ORM class, got "
                f"{target!r}",
                option="tables",
            )
        table = mapper.local_table
        # ORM users name attributes; the attribute key may differ from the column name. Columns
        # inherited from a parent table live elsewhere and cannot be written here.
        columns = {key: col for key, col in mapper.columns.items() if col.table is table}
    if not columns:
        raise ConfigurationError(f"tables[{model!r}]: table {table.name!r} has no columns")
    field_of = {col: key for key, col in columns.items()}
    keys: set[frozenset[str]] = set()
    constraints = [
        [*c.columns]
        for c in table.constraints
        if isinstance(c, (sa.PrimaryKeyConstraint, sa.UniqueConstraint))
    ]
    constraints += [
        [*i.columns]
        for i in table.indexes
        if i.unique and all(isinstance(e, sa.Column) for e in i.expressions)
    ]
    constraints += [[c] for c in table.columns if c.unique]
    for cols in constraints:
        if cols and all(c in field_of for c in cols):
            keys.add(frozenset(field_of[c] for c in cols))
    leads = {field_of[cols[0]] for cols in constraints if cols and cols[0] in field_of}
    leads.update(
        field_of[e]
        for i in table.indexes
        for e in i.expressions[:1]
        if isinstance(e, sa.Column) and e in field_of
    )
    return Model(model, table, columns, frozenset(keys), frozenset(leads))


def resolve_tables(tables: object) -> dict[str, Model]:
    """Resolve and validate the ``tables`` mapping.

    :raises ConfigurationError: a key is not a non-empty str, or a value is neither a
        :class:`~sqlalchemy.Table` nor a mapped class with a table.
    """
    if not isinstance(tables, Mapping) or not tables:
        raise ConfigurationError(
            "tables must be a non-empty mapping of model name to Table or ORM class, e.g. "
            "tables={'groups': groups_table}",
            option="tables",
        )
    return {name: _resolve(name, target) for name, target in tables.items()}


def check_update(models: Mapping[str, Model], update: Update, *, upsert: bool) -> Model:
    """Return the model *update* writes to, or raise naming what is wrong.

    :raises UnwritableUpdateError: unknown model, unknown column, a column used twice, no
        filters, or (for upsert) filters that are NULL or not a unique key.
    """
    model = models.get(update.model)
    if model is None:
        known = sorted(models)
        raise UnwritableUpdateError(
            f"model {update.model!r} is not mapped to a table; mapped models: {_listing(known)}."
            " Add it to SQLAlchemyFlush(tables=...)",
            model=update.model,
            field="model",
            expected=f"one of {known!r}",
            got=repr(update.model),
        )
    if not update.filters:
        # Without a WHERE clause an UPDATE would touch every row of the table.
        raise UnwritableUpdateError(
            f"update of model {update.model!r} has no filters; a row is identified by at least"
            " one column",
            model=update.model,
            field="filters",
            expected="at least one filter",
            got="{}",
        )
    seen: dict[str, str] = {}
    for op in _OPS:
        for name in getattr(update, op):
            if name not in model.columns:
                known = sorted(model.columns)
                raise UnwritableUpdateError(
                    f"{op}[{name!r}] of model {update.model!r}: table {model.table.fullname!r} "
                    f"has no column {name!r}; its columns: {_listing(known)}",
                    model=update.model,
                    field=f"{op}[{name!r}]",
                    expected=f"a column of {model.table.fullname!r}",
                    got=repr(name),
                )
            if name in seen:
                raise UnwritableUpdateError(
                    f"column {name!r} of model {update.model!r} appears in both {seen[name]} and "
                    f"{op}; one update can give a column only one operation",
                    model=update.model,
                    field=f"{op}[{name!r}]",
                    expected="each column in one of filters/columns/extra/greatest/least",
                    got=f"{seen[name]} and {op}",
                )
            seen[name] = op
    if upsert:
        nulls = [name for name, value in update.filters.items() if value is None]
        if nulls:
            raise UnwritableUpdateError(
                f"filters[{nulls[0]!r}] of model {update.model!r} is None: upsert cannot match "
                "NULL (it would insert a new row on every flush)",
                model=update.model,
                field=f"filters[{nulls[0]!r}]",
                expected="a non-NULL value",
                got="None",
            )
        if frozenset(update.filters) not in model.unique_keys:
            keys = sorted(sorted(k) for k in model.unique_keys)
            raise UnwritableUpdateError(
                f"upsert of model {update.model!r} by {sorted(update.filters)!r}: table "
                f"{model.table.fullname!r} has no primary key or unique constraint on exactly "
                f"these columns (declared keys: {keys!r}); INSERT ... ON CONFLICT needs one",
                model=update.model,
                field="filters",
                expected=f"one of {keys!r}",
                got=repr(sorted(update.filters)),
            )
    return model


def writes(update: Update, *, upsert: bool) -> bool:
    """Whether *update* writes anything (a signal, or an update with no values, does not)."""
    if update.signal_only:
        return False
    return upsert or bool(update.columns or update.extra or update.greatest or update.least)


def signature(update: Update) -> Signature:
    """Return the shape of *update*: which columns it filters on and writes, by operation."""
    return (
        tuple(sorted((name, value is None) for name, value in update.filters.items())),
        tuple(sorted(update.columns)),
        tuple(sorted(update.extra)),
        tuple(sorted(update.greatest)),
        tuple(sorted(update.least)),
    )


def sort_key(update: Update) -> tuple[tuple[str, str, Value], ...]:
    """Sort key of a row: its filters by name, each value tagged with its type name."""
    # The type name keeps values of different types apart, so `<` only ever compares values of
    # one type (1 and "1" are different rows to the buffer).
    return tuple((k, type(v).__name__, v) for k, v in sorted(update.filters.items()))


def sort_rows(rows: list[Update]) -> list[Update]:
    """Sort rows by filters so that every flusher locks rows in the same order."""
    names = list(rows[0].filters) if rows else []
    if len(names) == 1 and all(type(u.filters.get(names[0])) is int for u in rows):
        # The hot shape ({"id": 42}): plain ints order the same as their tagged keys.
        return sorted(rows, key=lambda u: u.filters[names[0]])  # type: ignore[arg-type,return-value]  # ints
    try:
        return sorted(rows, key=sort_key)
    except TypeError:  # values of one type that do not order (never for codec types in practice)
        return sorted(rows, key=lambda u: repr(sort_key(u)))


class Checker:
    """:func:`check_update` plus :func:`signature`, remembering shapes already checked.

    Rows of one batch nearly always share a few shapes; checking each shape once keeps the
    per-row cost of a 500-row batch to a dict lookup.
    """

    def __init__(self, models: Mapping[str, Model], *, upsert: bool) -> None:
        self.models = models
        self.upsert = upsert
        self._shapes: dict[tuple[object, ...], tuple[Model, Signature]] = {}

    def __call__(self, update: Update) -> tuple[Model, Signature]:
        """Return the model and signature of *update*.

        :raises UnwritableUpdateError: as :func:`check_update`.
        """
        filters = update.filters
        if None in filters.values():  # NULL filters change the signature: no shortcut
            return check_update(self.models, update, upsert=self.upsert), signature(update)
        shape = (
            update.model,
            tuple(filters),
            tuple(update.columns),
            tuple(update.extra),
            tuple(update.greatest),
            tuple(update.least),
        )
        known = self._shapes.get(shape)
        if known is None:
            model = check_update(self.models, update, upsert=self.upsert)
            known = (model, signature(update))
            if len(self._shapes) < _SHAPES_KEPT:
                self._shapes[shape] = known
        return known
