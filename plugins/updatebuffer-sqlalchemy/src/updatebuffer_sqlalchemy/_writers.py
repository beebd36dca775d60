"""Turn the rows of one model into SQL: a generic writer, and SQLite and PostgreSQL fast paths.

Every writer gets the rows of one model, already checked and grouped by signature
(``_schema.Checker``), inside an open transaction. Writers sort rows by their filters before
writing, so that concurrent flushers lock rows in one order.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import threading
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from updatebuffer_sqlalchemy._schema import sort_key, sort_rows

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Mapping

    from sqlalchemy.engine import Connection, Dialect
    from sqlalchemy.sql.elements import ColumnElement
    from updatebuffer import Update

    from updatebuffer_sqlalchemy._schema import Model, Signature

__all__ = ["Groups", "Writer", "writer_for"]

log = logging.getLogger("updatebuffer_sqlalchemy")

Params: TypeAlias = dict[str, Any]
#: Rows of one model by signature.
Groups: TypeAlias = "Mapping[Signature, list[Update]]"
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


def _sorted_runs(groups: Groups) -> list[tuple[Signature, list[Update]]]:
    """All rows sorted by filters, cut into consecutive runs of one signature (exact lock order)."""
    sig_of = {id(u): sig for sig, run in groups.items() for u in run}
    runs: list[tuple[Signature, list[Update]]] = []
    for u in sort_rows([u for run in groups.values() for u in run]):
        sig = sig_of[id(u)]
        if runs and runs[-1][0] == sig:
            runs[-1][1].append(u)
        else:
            runs.append((sig, [u]))
    return runs


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


# Dialects whose datetime columns keep no UTC offset: SQLAlchemy stores an aware datetime's wall
# clock there, so 13:00+02:00 would be stored as 13:00 and compare after 12:00Z. MySQL and
# MariaDB are listed by name, not tested here.
_OFFSET_DROPPING = frozenset({"sqlite", "mysql", "mariadb"})
_UTC = datetime.timezone.utc


def _utc_params(model: Model, sig: Signature) -> Callable[[Signature, Update], Params]:
    """Return the parameter builder of *sig* that binds aware datetimes as UTC instants.

    Only values bound to datetime columns through ``extra``, ``greatest`` or ``least`` are
    converted; filters stay as given, to match the rows as the host stored them.
    """
    fields = [
        (f"{_PREFIX[op]}{i}", op, name)
        for op, names in zip(("extra", "greatest", "least"), sig[2:], strict=True)
        for i, name in enumerate(names)
        if isinstance(model.columns[name].type, sa.DateTime)
    ]
    if not fields:
        return _params

    def params(sig: Signature, update: Update) -> Params:
        out = _params(sig, update)
        for key, op, name in fields:
            value = getattr(update, op)[name]
            if type(value) is datetime.datetime:
                tz = value.tzinfo
                # Already UTC (the codec's own tzinfo): its wall clock is the instant.
                if tz is not None and tz is not _UTC:
                    out[key] = value.astimezone(_UTC)
        return out

    return params


class Writer:
    """Generic SQLAlchemy writer: one statement per row shape, executed for many rows.

    Works on every dialect. ``greatest``/``least`` use ``CASE`` so that a NULL column takes the
    new value; upsert is an UPDATE and, when it matched no row, an INSERT.
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        # Where offsets are dropped, values are stored as UTC instants so that greatest/least
        # and later reads compare instants, not wall clocks.
        self._utc = dialect.name in _OFFSET_DROPPING
        self._cache: dict[Hashable, Any] = {}
        self._cache_lock = threading.Lock()

    def params(self, model: Model, sig: Signature) -> Callable[[Signature, Update], Params]:
        """Return the function building one row's bound parameters for *sig*."""
        if not self._utc:
            return _params
        built: Callable[[Signature, Update], Params] = self._cached(
            ("params", model.name, sig), partial(_utc_params, model, sig)
        )
        return built

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

    def update(self, conn: Connection, model: Model, groups: Groups) -> int:
        """Apply the rows to existing rows; return how many rows matched none."""
        missing = 0
        for sig, run in _sorted_runs(groups):
            params = self.params(model, sig)
            result = conn.execute(self.update_stmt(model, sig), [params(sig, u) for u in run])
            if result.rowcount >= 0:
                missing += max(0, len(run) - result.rowcount)
        return missing

    def upsert(self, conn: Connection, model: Model, groups: Groups) -> dict[int, bool]:
        """Apply the rows, creating missing ones; return ``id(update) -> created``."""
        created: dict[int, bool] = {}
        for sig, run in _sorted_runs(groups):
            update = self.update_stmt(model, sig)
            insert = self._cached(("insert", model.name, sig), partial(self._insert, model, sig))
            build = self.params(model, sig)
            for u in run:
                params = build(sig, u)
                # Row by row, because only a single-row UPDATE says whether this row exists. A
                # concurrent insert of the same key fails the transaction; the retry updates it.
                if conn.execute(update, params).rowcount > 0:
                    created[id(u)] = False
                else:
                    conn.execute(insert, params)
                    created[id(u)] = True
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

    def upsert(self, conn: Connection, model: Model, groups: Groups) -> dict[int, bool]:
        """One ``INSERT ... ON CONFLICT DO UPDATE`` executemany per row shape.

        Which rows exist is read first in the same transaction, with the database's own
        comparison (a VALUES list joined to the table), so "created" is exact.
        """
        created: dict[int, bool] = {}
        for sig, run in _sorted_runs(groups):
            flags = self._existing(conn, model, sig, run)
            created.update((id(u), made) for u, made in zip(run, flags, strict=True))
            stmt = self._cached(("upsert", model.name, sig), partial(self._upsert, model, sig))
            params = self.params(model, sig)
            conn.execute(stmt, [params(sig, u) for u in run])
        return created

    def _upsert(self, model: Model, sig: Signature) -> Any:
        stmt = sqlite.insert(model.table).values(self.insert_values(model, sig))
        keys = [model.columns[name] for name, _ in sig[0]]
        excluded = stmt.excluded
        values = self.set_clause(model, sig, lambda _p, _i, col: excluded[col.key])
        if not values:  # nothing to write: DO UPDATE needs a SET, make it a no-op
            values = {keys[0]: excluded[keys[0].key]}
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


def _literal_kind(kind: sa.types.TypeEngine[Any]) -> str | None:
    """How values of a column type are spelled in an array literal, or None to let the driver.

    Only plain built-in types: anything with its own bind processing (TypeDecorator, Enum) and
    timestamps without time zone (whose conversion from aware values the driver owns) go through
    the driver's list adaptation instead.
    """
    if isinstance(kind, (sa.TypeDecorator, sa.Enum)):
        return None
    if isinstance(kind, sa.Boolean):
        return "bool"
    if isinstance(kind, sa.Integer):
        return "int"
    if isinstance(kind, sa.Numeric):
        return "num"
    if isinstance(kind, sa.String):
        return "str"
    if isinstance(kind, sa.DateTime):
        return "tstz" if kind.timezone else None
    if isinstance(kind, sa.Date):
        return "date"
    if isinstance(kind, sa.Uuid):
        return "uuid"
    return None


def _cast_type(kind: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    """Return the array element type to cast to: strings as TEXT.

    An explicit cast to ``VARCHAR(n)`` or ``CHAR(n)`` silently truncates; casting to TEXT leaves
    the length check to the assignment (an error, as with any other write) and the comparison of
    a filter to the column's own rules.
    """
    impl = kind.impl_instance if isinstance(kind, sa.TypeDecorator) else kind
    if isinstance(impl, sa.String) and not isinstance(impl, sa.Enum):
        return sa.Text()
    return kind


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _array_literal(values: list[Any], kind: str | None) -> str | None:
    """Spell *values* as a PostgreSQL array literal, or return None if any value does not fit.

    psycopg adapts a Python list element by element in Python; for the 500-element arrays of a
    batch, joining strings is several times faster and leaves the parsing to the server.
    """
    if kind is None:
        return None
    types = {type(v) for v in values}
    types.discard(type(None))
    if kind in ("int", "num") and types <= {int}:
        if type(None) in {type(v) for v in values}:
            return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"
        return "{" + ",".join(map(str, values)) + "}"
    allowed: dict[str, set[type]] = {
        "num": {int, float, decimal.Decimal},
        "bool": {bool},
        "str": {str},
        "tstz": {datetime.datetime},
        "date": {datetime.date},
        "uuid": {uuid.UUID},
    }
    if not types <= allowed[kind]:
        return None
    if kind == "tstz" and any(v is not None and v.tzinfo is None for v in values):
        return None
    spell: Callable[[Any], str]
    if kind == "str":
        spell = _quote
    elif kind == "bool":
        spell = lambda v: "t" if v else "f"  # noqa: E731 - one-line table entry
    elif kind in ("tstz", "date"):
        spell = datetime.date.isoformat
    else:  # num, uuid: str() is the input syntax
        spell = str
    return "{" + ",".join("NULL" if v is None else spell(v) for v in values) + "}"


class PostgresWriter(Writer):
    """PostgreSQL: one set-based statement per model and row shape, one array per column.

    Updates are ``UPDATE ... FROM unnest(...)``; upserts ``INSERT ... SELECT FROM unnest(...)
    ON CONFLICT DO UPDATE``. ``GREATEST``/``LEAST`` already ignore NULL. Rows whose filters or
    values the array form cannot carry faithfully (mixed Python types in one column,
    float/Decimal/datetime filters, array or JSON columns) go through the generic statements.
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
        for name, is_null in sig[0]:
            if is_null:
                continue
            kinds = {type(u.filters[name]) for u in run}
            if len(kinds) != 1 or not kinds <= _FAST_FILTER_TYPES:
                return None
        for op, part in zip(("extra", "greatest", "least"), sig[2:], strict=True):
            for name in part:
                kinds = {type(getattr(u, op)[name]) for u in run} - {type(None)}
                if len(kinds) > 1:  # one array holds one element type
                    return None
        return tuple(any(type(u.columns[name]) is float for u in run) for name in sig[1])

    @staticmethod
    def _sort(sig: Signature, run: list[Update]) -> None:
        # _plan checked one Python type per filter column: plain values compare directly.
        names = [name for name, is_null in sig[0] if not is_null]
        if len(names) == 1:
            [name] = names
            run.sort(key=lambda u: u.filters[name])  # type: ignore[arg-type,return-value]  # one type
        else:
            run.sort(key=lambda u: tuple(u.filters[n] for n in names))

    def _arrays(
        self, model: Model, sig: Signature, floats: tuple[bool, ...], run: list[Update]
    ) -> tuple[tuple[bool, ...], Params, list[str], list[str], list[Any]]:
        """Per array: literal or list, its value, the ``unnest`` argument, alias and bind."""
        compile_type = self.dialect.type_compiler_instance.process
        flags: list[bool] = []
        params: Params = {}
        args: list[str] = []
        aliases: list[str] = []
        binds: list[Any] = []

        def add(name: str, kind: sa.types.TypeEngine[Any], values: list[Any]) -> None:
            literal = _array_literal(values, _literal_kind(kind))
            flags.append(literal is not None)
            params[name] = literal if literal is not None else values
            args.append(f"CAST(:{name} AS {compile_type(_cast_type(kind))}[])")
            aliases.append(name)
            # A literal is sent untyped, so the server parses it straight into the array type.
            binds.append(
                sa.bindparam(name)
                if literal is not None
                else sa.bindparam(name, type_=postgresql.ARRAY(kind))
            )

        cols = model.columns
        for i, (name, is_null) in enumerate(sig[0]):
            if not is_null:
                add(f"ub_f{i}", cols[name].type, [u.filters[name] for u in run])
        for i, name in enumerate(sig[1]):
            deltas = [u.columns[name] for u in run]
            if floats[i]:  # one element type: a column that got any float delta sums as float8
                add(f"ub_c{i}", sa.Double(), [float(d) for d in deltas])
            else:
                add(f"ub_c{i}", cols[name].type, deltas)
        for op, part in zip(("extra", "greatest", "least"), sig[2:], strict=True):
            for i, name in enumerate(part):
                add(f"{_PREFIX[op]}{i}", cols[name].type, [getattr(u, op)[name] for u in run])
        return tuple(flags), params, args, aliases, binds

    def _q(self, name: str) -> str:
        # text() reads ":word" as a bind parameter, even inside a quoted identifier.
        return self.dialect.identifier_preparer.quote(name).replace(":", "\\:")

    def _table(self, model: Model) -> str:
        return self.dialect.identifier_preparer.format_table(model.table).replace(":", "\\:")

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

    def _fast_update(
        self, model: Model, sig: Signature, args: list[str], aliases: list[str], binds: list[Any]
    ) -> Any:
        q = self._q
        where = [
            f"t.{q(model.columns[name].name)} IS NULL"
            if is_null
            else f"t.{q(model.columns[name].name)} = v.ub_f{i}"
            for i, (name, is_null) in enumerate(sig[0])
        ]
        sets = self._sets(model, sig, lambda alias, _c: f"v.{alias}")
        # Only the ordinals that matched *no* row come back (usually none), not one per row.
        sql = (
            f"WITH u AS (UPDATE {self._table(model)} AS t SET {', '.join(sets)} "
            f"FROM unnest({', '.join(args)}) WITH ORDINALITY AS v({', '.join(aliases)}, ub_n) "
            f"WHERE {' AND '.join(where)} RETURNING v.ub_n) "
            "SELECT n FROM generate_series(1, CAST(:ub_count AS BIGINT)) AS n "
            "EXCEPT SELECT ub_n FROM u"
        )
        return sa.text(sql).bindparams(*binds, sa.bindparam("ub_count", type_=sa.BigInteger))

    def _fast_upsert(
        self, model: Model, sig: Signature, args: list[str], aliases: list[str], binds: list[Any]
    ) -> Any:
        q = self._q
        keys = [q(model.columns[name].name) for name, _ in sig[0]]
        targets = keys + [q(model.columns[n].name) for part in sig[1:] for n in part]
        sets = self._sets(model, sig, lambda _alias, c: f"EXCLUDED.{c}")
        if not sets:  # nothing to write: DO UPDATE needs a SET, make it a no-op
            sets = [f"{keys[0]} = EXCLUDED.{keys[0]}"]
        returning = ", ".join(f"t.{k} AS ub_k{i}" for i, k in enumerate(keys))
        join = " AND ".join(f"up.ub_k{i} = v.ub_f{i}" for i in range(len(keys)))
        # The CTE keeps each source row's ordinal; joining RETURNING back to it with the
        # database's own equality says which of *our* rows were inserted. xmax = 0 marks a row
        # version this statement inserted rather than updated. ORDER BY: insert in key order.
        sql = (
            f"WITH v AS (SELECT * FROM unnest({', '.join(args)}) WITH ORDINALITY "
            f"AS u({', '.join(aliases)}, ub_n)), "
            f"up AS (INSERT INTO {self._table(model)} AS t ({', '.join(targets)}) "
            f"SELECT {', '.join(aliases)} FROM v ORDER BY ub_n "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)} "
            f"RETURNING {returning}, (t.xmax = 0) AS ub_created) "
            "SELECT count(*), array_agg(v.ub_n) FILTER (WHERE up.ub_created) "
            f"FROM up JOIN v ON {join}"
        )
        return sa.text(sql).bindparams(*binds)

    def _statement(
        self, kind: str, model: Model, sig: Signature, floats: tuple[bool, ...], run: list[Update]
    ) -> tuple[Any, Params]:
        flags, params, args, aliases, binds = self._arrays(model, sig, floats, run)
        build = self._fast_update if kind == "update" else self._fast_upsert
        stmt = self._cached(
            (kind, model.name, sig, floats, flags), partial(build, model, sig, args, aliases, binds)
        )
        return stmt, params

    # -- writing --------------------------------------------------------------------------------

    def update(self, conn: Connection, model: Model, groups: Groups) -> int:
        """One ``UPDATE ... FROM unnest(...)`` per signature; unmatched rows go row by row."""
        missing = 0
        # Signatures in the order of their smallest key, rows sorted inside each.
        for sig, run in sorted(groups.items(), key=lambda g: repr(min(map(sort_key, g[1])))):
            floats = self._plan(model, sig, run)
            if floats is None:
                missing += super().update(conn, model, {sig: run})
                continue
            self._sort(sig, run)
            if any(not is_null and name in model.index_leads for name, is_null in sig[0]):
                # The planner may hash-join the whole table for a few hundred rows; with an index
                # on the filters, a nested loop over the sorted array is cheaper and locks rows in
                # key order. SET LOCAL ends with the transaction.
                conn.exec_driver_sql(
                    "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
                )
            stmt, params = self._statement("update", model, sig, floats, run)
            params["ub_count"] = len(run)
            left_over = conn.execute(stmt, params).scalars().all()
            if left_over:
                # Either no such row, or two source rows hit one target row (UPDATE ... FROM
                # applies only one of them): a per-row statement handles both exactly.
                left = [run[n - 1] for n in sorted(left_over)]
                missing += super().update(conn, model, {sig: left})
        return missing

    def upsert(self, conn: Connection, model: Model, groups: Groups) -> dict[int, bool]:
        """``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE``, reporting inserts."""
        created: dict[int, bool] = {}
        for sig, run in sorted(groups.items(), key=lambda g: repr(min(map(sort_key, g[1])))):
            floats = self._plan(model, sig, run)
            if floats is None:
                created.update(self._slow_upsert(conn, model, sig, sort_rows(run)))
                continue
            self._sort(sig, run)
            stmt, params = self._statement("upsert", model, sig, floats, run)
            total, made = conn.execute(stmt, params).one()
            if total != len(run):
                raise RuntimeError(  # never expected: roll back rather than report wrongly
                    f"upsert of {len(run)} {model.name!r} rows returned {total} rows"
                )
            inserted = set(made or ())
            created.update((id(u), n in inserted) for n, u in enumerate(run, start=1))
        return created

    def _slow_upsert(
        self, conn: Connection, model: Model, sig: Signature, run: list[Update]
    ) -> dict[int, bool]:
        def build() -> Any:
            stmt = postgresql.insert(model.table).values(self.insert_values(model, sig))
            keys = [model.columns[name] for name, _ in sig[0]]
            excluded = stmt.excluded
            values = self.set_clause(model, sig, lambda _p, _i, col: excluded[col.key])
            if not values:
                values = {keys[0]: excluded[keys[0].key]}
            return stmt.on_conflict_do_update(index_elements=keys, set_=values).returning(
                sa.literal_column("(xmax = 0)", sa.Boolean)
            )

        stmt = self._cached(("slow-upsert", model.name, sig), build)
        # One statement per row: a multi-row upsert cannot touch one target row twice.
        return {id(u): bool(conn.execute(stmt, _params(sig, u)).scalar_one()) for u in run}


def writer_for(dialect: Dialect) -> Writer:
    """Return the writer for *dialect*: PostgreSQL and SQLite fast paths, generic otherwise."""
    if dialect.name == "postgresql":
        return PostgresWriter(dialect)
    if dialect.name == "sqlite":
        return SQLiteWriter(dialect)
    return Writer(dialect)
