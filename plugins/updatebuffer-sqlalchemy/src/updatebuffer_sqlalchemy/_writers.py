"""Turn the rows of one model into SQL: a generic writer, and SQLite and PostgreSQL fast paths.

Every writer gets rows that were already checked (``_schema.check_update``) and sorted, inside an
open transaction, and returns one "created" flag per row.
"""

from __future__ import annotations

import datetime
import logging
import threading
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from updatebuffer_sqlalchemy._schema import runs, signature

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Sequence

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.sql.elements import ColumnElement
    from updatebuffer import Update

    from updatebuffer_sqlalchemy._schema import Model, Signature

__all__ = ["Writer", "writer_for"]

log = logging.getLogger("updatebuffer_sqlalchemy")

Params: TypeAlias = dict[str, Any]
Expr: TypeAlias = "ColumnElement[Any]"

# Bound parameter names: prefixed so they cannot clash with a column name SQLAlchemy reserves for
# the SET clause, and indexed by position in the signature.
_PREFIX = {
    "filters": "ub_f",
    "columns": "ub_c",
    "extra": "ub_e",
    "greatest": "ub_g",
    "least": "ub_l",
}
# SQLite allows 32766 host parameters per statement (since 3.32); stay well below.
_SQLITE_MAX_PARAMS = 10_000


def _params(sig: Signature, update: Update) -> Params:
    out: Params = {}
    for i, (name, is_null) in enumerate(sig[0]):
        if not is_null:
            out[f"ub_f{i}"] = update.filters[name]
    for op, names in zip(("columns", "extra", "greatest", "least"), sig[1:], strict=True):
        values = getattr(update, op)
        prefix = _PREFIX[op]
        for i, name in enumerate(names):
            out[f"{prefix}{i}"] = values[name]
    return out


class Writer:
    """Generic SQLAlchemy writer: one statement per row shape, executed for many rows.

    Works on every dialect. ``greatest``/``least`` use ``CASE`` so that a NULL column takes the
    new value; upsert is an UPDATE and, when it matched no row, an INSERT.
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._cache: dict[Hashable, Any] = {}
        self._cache_lock = threading.Lock()

    def _cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        stmt = self._cache.get(key)
        if stmt is None:
            stmt = build()
            with self._cache_lock:
                self._cache[key] = stmt
        return stmt

    # -- expressions ----------------------------------------------------------------------------

    def greatest(self, current: Expr, new: Expr) -> Expr:
        """``max(current, new)``, NULL counting as absent."""
        return sa.case((current.is_(None), new), (new > current, new), else_=current)

    def least(self, current: Expr, new: Expr) -> Expr:
        """``min(current, new)``, NULL counting as absent."""
        return sa.case((current.is_(None), new), (new < current, new), else_=current)

    def set_clause(
        self, model: Model, sig: Signature, new: Callable[[str, int, sa.Column[Any]], Expr]
    ) -> dict[sa.Column[Any], Expr]:
        """Build the SET clause of *sig*; ``new(prefix, i, column)`` gives the incoming value."""
        cols = model.columns
        out: dict[sa.Column[Any], Expr] = {}
        for i, name in enumerate(sig[1]):
            col = cols[name]
            # COALESCE: a NULL counter that receives increments would otherwise stay NULL forever.
            out[col] = sa.func.coalesce(col, 0) + new("ub_c", i, col)
        for i, name in enumerate(sig[2]):
            out[cols[name]] = new("ub_e", i, cols[name])
        for i, name in enumerate(sig[3]):
            out[cols[name]] = self.greatest(cols[name], new("ub_g", i, cols[name]))
        for i, name in enumerate(sig[4]):
            out[cols[name]] = self.least(cols[name], new("ub_l", i, cols[name]))
        return out

    @staticmethod
    def bind(prefix: str, i: int, col: sa.Column[Any]) -> Expr:
        """Return a bound parameter typed like *col*."""
        return sa.bindparam(f"{prefix}{i}", type_=col.type)

    def where(self, model: Model, sig: Signature) -> list[Expr]:
        """Build the WHERE clause of *sig* (``IS NULL`` for a NULL filter: ``=`` never matches)."""
        conds: list[Expr] = []
        for i, (name, is_null) in enumerate(sig[0]):
            col = model.columns[name]
            conds.append(col.is_(None) if is_null else col == self.bind("ub_f", i, col))
        return conds

    def update_stmt(self, model: Model, sig: Signature) -> Any:
        """``UPDATE table SET ... WHERE filters`` with bound parameters, for executemany."""

        def build() -> Any:
            values = self.set_clause(model, sig, self.bind)
            if not values:  # upsert of a row with no values: only make sure it exists
                first = model.columns[sig[0][0][0]]
                values = {first: first}
            return sa.update(model.table).where(*self.where(model, sig)).values(values)

        return self._cached(("update", model.name, sig), build)

    def _insert(self, model: Model, sig: Signature) -> Any:
        return sa.insert(model.table).values(self.insert_values(model, sig))

    def insert_values(self, model: Model, sig: Signature) -> dict[sa.Column[Any], Expr]:
        """Column values of a new row: the filters and each incoming value."""
        cols = model.columns
        values = {
            cols[name]: self.bind("ub_f", i, cols[name]) for i, (name, _) in enumerate(sig[0])
        }
        for op, names in zip(("columns", "extra", "greatest", "least"), sig[1:], strict=True):
            for i, name in enumerate(names):
                values[cols[name]] = self.bind(_PREFIX[op], i, cols[name])
        return values

    # -- writing --------------------------------------------------------------------------------

    def update(self, conn: Connection, model: Model, rows: Sequence[Update]) -> int:
        """Apply *rows* (sorted) to existing rows; return how many rows matched none."""
        missing = 0
        for sig, run in runs(list(rows)):
            result = conn.execute(self.update_stmt(model, sig), [_params(sig, u) for u in run])
            if result.rowcount >= 0:
                missing += max(0, len(run) - result.rowcount)
        return missing

    def upsert(self, conn: Connection, model: Model, rows: Sequence[Update]) -> list[bool]:
        """Apply *rows*, creating the missing ones; return which rows were created."""
        created: list[bool] = []
        for sig, run in runs(list(rows)):
            update = self.update_stmt(model, sig)
            insert = self._cached(("insert", model.name, sig), partial(self._insert, model, sig))
            for u in run:
                params = _params(sig, u)
                # Row by row, because only a single-row UPDATE says whether this row exists. A
                # concurrent insert of the same key fails the transaction; the retry updates it.
                if conn.execute(update, params).rowcount > 0:
                    created.append(False)
                else:
                    conn.execute(insert, params)
                    created.append(True)
        return created


class SQLiteWriter(Writer):
    """SQLite: ``executemany`` per row shape, ``INSERT ... ON CONFLICT DO UPDATE`` for upsert.

    SQLite's two-argument ``max()``/``min()`` return NULL when either argument is NULL, so
    ``COALESCE(max(col, new), col, new)`` gives "NULL counts as absent".
    """

    def greatest(self, current: Expr, new: Expr) -> Expr:
        """``COALESCE(max(current, new), current, new)``."""
        return sa.func.coalesce(sa.func.max(current, new), current, new)

    def least(self, current: Expr, new: Expr) -> Expr:
        """``COALESCE(min(current, new), current, new)``."""
        return sa.func.coalesce(sa.func.min(current, new), current, new)

    def upsert(self, conn: Connection, model: Model, rows: Sequence[Update]) -> list[bool]:
        """One ``INSERT ... ON CONFLICT DO UPDATE`` executemany per row shape.

        Which rows exist is read first in the same transaction, with the database's own
        comparison (a VALUES list joined to the table), so "created" is exact.
        """
        created: list[bool] = []
        for sig, run in runs(list(rows)):
            created.extend(self._existing(conn, model, sig, run))
            stmt = self._cached(("upsert", model.name, sig), partial(self._upsert, model, sig))
            conn.execute(stmt, [_params(sig, u) for u in run])
        return created

    def _upsert(self, model: Model, sig: Signature) -> Any:
        stmt = sqlite.insert(model.table).values(self.insert_values(model, sig))
        keys = [model.columns[name] for name, _ in sig[0]]
        excluded = stmt.excluded
        values = self.set_clause(model, sig, lambda _p, _i, col: excluded[col.name])
        if not values:  # nothing to write: DO UPDATE needs a SET, make it a no-op
            values = {keys[0]: excluded[keys[0].name]}
        return stmt.on_conflict_do_update(index_elements=keys, set_=values)

    def _existing(
        self, conn: Connection, model: Model, sig: Signature, run: list[Update]
    ) -> list[bool]:
        keys = [model.columns[name] for name, _ in sig[0]]
        names = [name for name, _ in sig[0]]
        found: set[int] = set()
        step = max(1, _SQLITE_MAX_PARAMS // (len(keys) + 1))
        for start in range(0, len(run), step):
            chunk = run[start : start + step]
            values = sa.values(
                sa.column("ub_n", sa.Integer),
                *(sa.column(f"ub_k{i}", col.type) for i, col in enumerate(keys)),
                name="ub_v",
            ).data([(start + n, *(u.filters[k] for k in names)) for n, u in enumerate(chunk)])
            v = values.cte("ub_v")  # SQLite names VALUES columns only in a CTE, not "AS v(a, b)"
            on = sa.and_(*(col == v.c[f"ub_k{i}"] for i, col in enumerate(keys)))
            found.update(conn.execute(sa.select(v.c.ub_n).join_from(v, model.table, on)).scalars())
        return [n not in found for n in range(len(run))]


# Filter value types whose equality in Python matches the database's, so rows the buffer keeps
# apart stay apart in one set-based statement (1 and 1.0, or two offsets of one instant, do not).
_FAST_FILTER_TYPES = frozenset({int, str, uuid.UUID, datetime.date, bytes, bool})


def _is_plain(col: sa.Column[Any]) -> bool:
    kind = col.type
    if isinstance(kind, sa.TypeDecorator):
        kind = kind.impl_instance
    # unnest() flattens arrays of arrays, and JSON or untyped columns need no array round trip.
    return not isinstance(kind, (sa.ARRAY, sa.JSON, sa.types.NullType))


class PostgresWriter(Writer):
    """PostgreSQL: one set-based statement per model and row shape, one array per column.

    Updates are ``UPDATE ... FROM unnest(...)``; upserts ``INSERT ... SELECT FROM unnest(...)
    ON CONFLICT DO UPDATE``.

    ``GREATEST``/``LEAST`` already ignore NULL. Rows whose filters or values the fast form cannot
    carry faithfully (mixed Python types in one column, float/Decimal/datetime filters, array or
    JSON columns) go through the generic statements instead.
    """

    def greatest(self, current: Expr, new: Expr) -> Expr:
        """``GREATEST(current, new)``."""
        return sa.func.greatest(current, new)

    def least(self, current: Expr, new: Expr) -> Expr:
        """``LEAST(current, new)``."""
        return sa.func.least(current, new)

    # -- fast path eligibility ------------------------------------------------------------------

    def _plan(self, model: Model, sig: Signature, run: list[Update]) -> tuple[bool, ...] | None:
        """Return per-delta-column "has a float" flags if *run* fits the array form, else None."""
        cols = model.columns
        names = [n for n, _ in sig[0]] + [n for part in sig[1:] for n in part]
        if not all(_is_plain(cols[n]) for n in names):
            return None
        for i, (name, is_null) in enumerate(sig[0]):
            if is_null:
                continue
            kinds = {type(u.filters[name]) for u in run}
            if len(kinds) != 1 or not kinds <= _FAST_FILTER_TYPES:
                return None
            del i
        for op, part in zip(("extra", "greatest", "least"), sig[2:], strict=True):
            for name in part:
                kinds = {type(getattr(u, op)[name]) for u in run} - {type(None)}
                if len(kinds) > 1:  # one array holds one element type
                    return None
        return tuple(any(type(u.columns[name]) is float for u in run) for name in sig[1])

    def _arrays(
        self, model: Model, sig: Signature, floats: tuple[bool, ...]
    ) -> tuple[list[str], list[str], list[sa.BindParameter[Any]]]:
        """``unnest`` arguments, their column aliases, and the typed bind parameters."""
        quote_type = self.dialect.type_compiler_instance.process
        args: list[str] = []
        aliases: list[str] = []
        binds: list[sa.BindParameter[Any]] = []

        def add(name: str, kind: sa.types.TypeEngine[Any]) -> None:
            args.append(f"CAST(:{name} AS {quote_type(kind)}[])")
            aliases.append(name)
            binds.append(sa.bindparam(name, type_=postgresql.ARRAY(kind)))

        for i, (name, is_null) in enumerate(sig[0]):
            if not is_null:
                add(f"ub_f{i}", model.columns[name].type)
        for i, name in enumerate(sig[1]):
            add(f"ub_c{i}", sa.Double() if floats[i] else model.columns[name].type)
        for op, part in zip(("extra", "greatest", "least"), sig[2:], strict=True):
            for i, name in enumerate(part):
                add(f"{_PREFIX[op]}{i}", model.columns[name].type)
        return args, aliases, binds

    def _q(self, name: str) -> str:
        # text() reads ":word" as a bind parameter, even inside a quoted identifier.
        return self.dialect.identifier_preparer.quote(name).replace(":", "\\:")

    def _sets(self, model: Model, sig: Signature, new: Callable[[str, str], str]) -> list[str]:
        q = self._q
        sets: list[str] = []
        for i, name in enumerate(sig[1]):
            c = q(model.columns[name].name)
            sets.append(f"{c} = COALESCE(t.{c}, 0) + {new(f'ub_c{i}', c)}")
        for i, name in enumerate(sig[2]):
            c = q(model.columns[name].name)
            sets.append(f"{c} = {new(f'ub_e{i}', c)}")
        for fn, op, part in (("GREATEST", "greatest", sig[3]), ("LEAST", "least", sig[4])):
            for i, name in enumerate(part):
                c = q(model.columns[name].name)
                sets.append(f"{c} = {fn}(t.{c}, {new(f'{_PREFIX[op]}{i}', c)})")
        return sets

    def _table(self, model: Model) -> str:
        return self.dialect.identifier_preparer.format_table(model.table).replace(":", "\\:")

    def _fast_update(self, model: Model, sig: Signature, floats: tuple[bool, ...]) -> Any:
        def build() -> Any:
            args, aliases, binds = self._arrays(model, sig, floats)
            q = self._q
            where = [
                f"t.{q(model.columns[name].name)} IS NULL"
                if is_null
                else f"t.{q(model.columns[name].name)} = v.ub_f{i}"
                for i, (name, is_null) in enumerate(sig[0])
            ]
            sets = self._sets(model, sig, lambda alias, _c: f"v.{alias}")
            sql = (
                f"UPDATE {self._table(model)} AS t SET {', '.join(sets)} "
                f"FROM unnest({', '.join(args)}) WITH ORDINALITY AS v({', '.join(aliases)}, ub_n) "
                f"WHERE {' AND '.join(where)} RETURNING v.ub_n"
            )
            return sa.text(sql).bindparams(*binds)

        return self._cached(("fast-update", model.name, sig, floats), build)

    def _fast_upsert(self, model: Model, sig: Signature, floats: tuple[bool, ...]) -> Any:
        def build() -> Any:
            args, aliases, binds = self._arrays(model, sig, floats)
            q = self._q
            keys = [q(model.columns[name].name) for name, _ in sig[0]]
            targets = keys + [q(model.columns[n].name) for part in sig[1:] for n in part]
            sets = self._sets(model, sig, lambda _alias, c: f"EXCLUDED.{c}")
            if not sets:  # nothing to write: DO UPDATE needs a SET, make it a no-op
                sets = [f"{keys[0]} = EXCLUDED.{keys[0]}"]
            returning = ", ".join(f"t.{k} AS ub_k{i}" for i, k in enumerate(keys))
            join = " AND ".join(f"up.ub_k{i} = v.ub_f{i}" for i in range(len(keys)))
            # The CTE keeps each source row's ordinal; joining RETURNING back to it with the
            # database's own equality says which of *our* rows were inserted. xmax = 0 marks a
            # row version this statement inserted rather than updated.
            sql = (
                f"WITH v AS (SELECT * FROM unnest({', '.join(args)}) WITH ORDINALITY "
                f"AS u({', '.join(aliases)}, ub_n)), "
                f"up AS (INSERT INTO {self._table(model)} AS t ({', '.join(targets)}) "
                f"SELECT {', '.join(aliases)} FROM v ORDER BY ub_n "
                f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)} "
                f"RETURNING {returning}, (t.xmax = 0) AS ub_created) "
                f"SELECT v.ub_n, up.ub_created FROM up JOIN v ON {join}"
            )
            return sa.text(sql).bindparams(*binds)

        return self._cached(("fast-upsert", model.name, sig, floats), build)

    def _arrays_params(self, sig: Signature, run: list[Update], floats: tuple[bool, ...]) -> Params:
        params: Params = {}
        for i, (name, is_null) in enumerate(sig[0]):
            if not is_null:
                params[f"ub_f{i}"] = [u.filters[name] for u in run]
        for i, name in enumerate(sig[1]):
            deltas = [u.columns[name] for u in run]
            # One array element type: a column that got any float delta is summed as float8.
            params[f"ub_c{i}"] = [float(d) for d in deltas] if floats[i] else deltas
        for op, part in zip(("extra", "greatest", "least"), sig[2:], strict=True):
            for i, name in enumerate(part):
                params[f"{_PREFIX[op]}{i}"] = [getattr(u, op)[name] for u in run]
        return params

    # -- writing --------------------------------------------------------------------------------

    def _groups(self, rows: Sequence[Update]) -> list[tuple[Signature, list[Update]]]:
        # Grouped by shape (not consecutive runs): the common case is one shape per model, so
        # one statement per model per batch. Rows stay sorted inside each group.
        groups: dict[Signature, list[Update]] = {}
        for u in rows:
            groups.setdefault(signature(u), []).append(u)
        return list(groups.items())

    def update(self, conn: Connection, model: Model, rows: Sequence[Update]) -> int:
        """``UPDATE ... FROM unnest(...)``; rows it did not match are retried one by one."""
        missing = 0
        for sig, run in self._groups(rows):
            floats = self._plan(model, sig, run)
            if floats is None:
                missing += super().update(conn, model, run)
                continue
            stmt = self._fast_update(model, sig, floats)
            done = set(conn.execute(stmt, self._arrays_params(sig, run, floats)).scalars())
            # A row missing from RETURNING either does not exist, or shares its target row with
            # another source row (UPDATE ... FROM applies only one of them): apply those again
            # with a per-row statement, which handles both exactly.
            left = [u for n, u in enumerate(run, start=1) if n not in done]
            if left:
                missing += super().update(conn, model, left)
        return missing

    def upsert(self, conn: Connection, model: Model, rows: Sequence[Update]) -> list[bool]:
        """``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE``, reporting inserts."""
        created_by_id: dict[int, bool] = {}
        for sig, run in self._groups(rows):
            floats = self._plan(model, sig, run)
            if floats is None:
                for u, made in zip(run, self._slow_upsert(conn, model, sig, run), strict=True):
                    created_by_id[id(u)] = made
                continue
            stmt = self._fast_upsert(model, sig, floats)
            result = conn.execute(stmt, self._arrays_params(sig, run, floats)).all()
            if len(result) != len(run):
                raise RuntimeError(  # never expected: roll back rather than report wrongly
                    f"upsert of {len(run)} {model.name!r} rows returned {len(result)} rows"
                )
            for n, made in result:
                created_by_id[id(run[n - 1])] = bool(made)
        return [created_by_id[id(u)] for u in rows]

    def _slow_upsert(
        self, conn: Connection, model: Model, sig: Signature, run: list[Update]
    ) -> list[bool]:
        def build() -> Any:
            stmt = postgresql.insert(model.table).values(self.insert_values(model, sig))
            keys = [model.columns[name] for name, _ in sig[0]]
            excluded = stmt.excluded
            values = self.set_clause(model, sig, lambda _p, _i, col: excluded[col.name])
            if not values:
                values = {keys[0]: excluded[keys[0].name]}
            return stmt.on_conflict_do_update(index_elements=keys, set_=values).returning(
                sa.literal_column("(xmax = 0)", sa.Boolean)
            )

        stmt = self._cached(("slow-upsert", model.name, sig), build)
        # One statement per row: a multi-row upsert cannot touch one target row twice.
        return [bool(conn.execute(stmt, _params(sig, u)).scalar_one()) for u in run]


def writer_for(dialect: Dialect) -> Writer:
    """Return the writer for *dialect*: PostgreSQL and SQLite fast paths, generic otherwise."""
    if dialect.name == "postgresql":
        return PostgresWriter(dialect)
    if dialect.name == "sqlite":
        return SQLiteWriter(dialect)
    return Writer(dialect)
