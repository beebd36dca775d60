"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from updatebuffer import Batch, Update

UTC = datetime.timezone.utc


class GenericSQLiteDialect(SQLiteDialect_pysqlite):
    """SQLite's real driver under a name the plugin has no fast path for."""

    name = "ubsa_generic_sqlite"
    supports_statement_cache = True


class GenericPostgresDialect(PGDialect_psycopg):
    """PostgreSQL's real driver (psycopg 3) under a name the plugin has no fast path for."""

    name = "ubsa_generic_postgresql"
    supports_statement_cache = True


registry.register("ubsa_generic_sqlite", __name__, "GenericSQLiteDialect")
registry.register("ubsa_generic_postgresql", __name__, "GenericPostgresDialect")


def generic_engine(engine: sa.Engine) -> sa.Engine:
    """An engine on the same database whose dialect takes the plugin's generic code paths."""
    name = "ubsa_generic_sqlite" if engine.dialect.name == "sqlite" else "ubsa_generic_postgresql"
    return sa.create_engine(engine.url.set(drivername=name))


@dataclass
class DB:
    """An engine plus the tables a test created, dropped again at teardown."""

    engine: sa.Engine
    metadata: sa.MetaData = field(default_factory=sa.MetaData)

    @property
    def name(self) -> str:
        return self.engine.dialect.name

    def groups(self) -> sa.Table:
        """A Sentry-like table: counters, extras, first/last seen, a composite unique key."""
        table = sa.Table(
            "groups",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("project_id", sa.Integer, nullable=True),
            sa.Column("hash", sa.String(64), nullable=True),
            sa.Column("times_seen", sa.BigInteger, nullable=False, server_default="0"),
            sa.Column("users", sa.Integer, nullable=True),
            sa.Column("score", sa.Float, nullable=True),
            sa.Column("message", sa.String(200), nullable=True),
            sa.Column("status", sa.Integer, nullable=True),
            sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
            sa.Column("first_seen", sa.DateTime(timezone=True), nullable=True),
            sa.Column("top", sa.Integer, nullable=True),
            sa.Column("bottom", sa.Integer, nullable=True),
            sa.UniqueConstraint("project_id", "hash"),
            sa.CheckConstraint("times_seen >= 0", name="times_seen_not_negative"),
            extend_existing=True,
        )
        self.metadata.create_all(self.engine)
        return table

    def rows(self, table: sa.Table) -> dict[int, dict[str, object]]:
        with self.engine.connect() as conn:
            return {
                r["id"]: dict(r)
                for r in conn.execute(sa.select(table).order_by(table.c.id)).mappings()
            }

    def insert(self, table: sa.Table, *rows: dict[str, object]) -> None:
        with self.engine.begin() as conn:
            for row in rows:  # one by one: the rows need not name the same columns
                conn.execute(sa.insert(table).values(row))

    def drop(self) -> None:
        self.metadata.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE IF EXISTS updatebuffer_applied_batches"))
        self.engine.dispose()


def batch(*updates: Update, id: str | None = None, attempt: int = 1) -> Batch:
    return Batch(list(updates), id=id or uuid.uuid4().hex, attempt=attempt)


def up(model: str = "groups", filters: dict[str, object] | None = None, **ops: object) -> Update:
    return Update(model=model, filters=filters or {"id": 1}, **ops)  # type: ignore[arg-type]


def ts(day: int, hour: int = 0) -> datetime.datetime:
    return datetime.datetime(2024, 1, day, hour, tzinfo=UTC)


def same_instant(a: object, b: datetime.datetime) -> bool:
    """SQLite hands back naive datetimes (stored as UTC text); compare as UTC."""
    assert isinstance(a, datetime.datetime)
    if a.tzinfo is None:
        a = a.replace(tzinfo=UTC)
    return a == b
