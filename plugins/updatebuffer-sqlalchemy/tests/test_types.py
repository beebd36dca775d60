"""Values of every codec type reach the database unchanged, on both fast paths and the fallbacks."""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from ubsa_helpers import batch, up

from updatebuffer_sqlalchemy import SQLAlchemyFlush

if TYPE_CHECKING:
    from ubsa_helpers import DB

UTC = datetime.timezone.utc
NASTY = [
    'quote " here',
    "back\\slash",
    "{braces},commas",
    "NULL",
    "",
    " spaced ",
    "ünï€ode ✓",
    "new\nline\ttab",
    "'single'",
]


class Upper(sa.TypeDecorator[str]):
    """A type with its own bind processing (stores upper case)."""

    impl = sa.String(50)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.upper()


def make_table(db: DB) -> sa.Table:
    table = sa.Table(
        "items",
        db.metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("Weird: Name", sa.Integer, nullable=True, key="weird"),
        sa.Column("text", sa.Text, nullable=True),
        sa.Column("flag", sa.Boolean, nullable=True),
        sa.Column("uid", sa.Uuid, nullable=True),
        sa.Column("day", sa.Date, nullable=True),
        sa.Column("amount", sa.Numeric(12, 3), nullable=True),
        sa.Column("ratio", sa.Float, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("naive_at", sa.DateTime(timezone=False), nullable=True),
        sa.Column("shout", Upper, nullable=True),
        sa.Column("code", sa.String(20), nullable=True),
    )
    db.metadata.create_all(db.engine)
    return table


@pytest.mark.parametrize("upsert", [False, True])
def test_values_of_every_type_round_trip(db: DB, upsert: bool) -> None:
    table = make_table(db)
    n = len(NASTY)
    if not upsert:
        db.insert(table, *({"id": i} for i in range(n)))
    flush = SQLAlchemyFlush(db.engine, {"items": table}, ledger=False, upsert=upsert)
    u0 = uuid.UUID(int=7)
    updates = [
        up(
            "items",
            {"id": i},
            columns={"weird": i, "ratio": 0.5, "amount": decimal.Decimal("1.25")},
            extra={
                "text": NASTY[i],
                "flag": i % 2 == 0,
                "uid": uuid.UUID(int=i),
                "day": datetime.date(2024, 1, 1 + i),
                "shout": "abc" if i else None,
                "naive_at": datetime.datetime(2024, 2, 1, 12, tzinfo=UTC),
            },
            greatest={"at": datetime.datetime(2024, 3, 1 + i, tzinfo=UTC)},
        )
        for i in range(n)
    ]
    flush(batch(*updates))
    flush(
        batch(
            *(up("items", {"id": i}, columns={"amount": decimal.Decimal("0.5")}) for i in range(n))
        )
    )
    with db.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(table))}
    for i in range(n):
        row = rows[i]
        assert row.weird == i
        assert row.text == NASTY[i]
        assert row.flag is (i % 2 == 0)
        assert row.uid == uuid.UUID(int=i) and (i != 7 or row.uid == u0)
        assert row.day == datetime.date(2024, 1, 1 + i)
        assert row.amount == decimal.Decimal("1.75")
        assert row.ratio == 0.5
        at = row.at if row.at.tzinfo else row.at.replace(tzinfo=UTC)
        assert at == datetime.datetime(2024, 3, 1 + i, tzinfo=UTC)
        assert row.shout == ("ABC" if i else None)  # the TypeDecorator's bind processing ran
        # An aware value in a naive column is stored as its UTC wall-clock time.
        assert row.naive_at == datetime.datetime(2024, 2, 1, 12)


def test_string_filters_with_nasty_values(db: DB) -> None:
    table = make_table(db)
    db.insert(table, *({"id": i, "code": f"c{i}", "weird": 0} for i in range(3)))
    flush = SQLAlchemyFlush(db.engine, {"items": table}, ledger=False)
    # Filtering on a column without any index: the planner is left alone.
    flush(batch(*(up("items", {"code": f"c{i}"}, columns={"weird": i + 1}) for i in range(3))))
    flush(batch(up("items", {"text": None}, columns={"weird": 10})))  # IS NULL on every row
    with db.engine.connect() as conn:
        got = dict(conn.execute(sa.select(table.c.code, table.c.weird)).all())
    assert got == {"c0": 11, "c1": 12, "c2": 13}


def test_mixed_int_and_float_deltas_in_one_column(db: DB) -> None:
    table = make_table(db)
    db.insert(table, *({"id": i, "ratio": 1.0, "weird": 1} for i in range(4)))
    flush = SQLAlchemyFlush(db.engine, {"items": table}, ledger=False)
    flush(
        batch(*(up("items", {"id": i}, columns={"ratio": 1 if i % 2 else 0.25}) for i in range(4)))
    )
    with db.engine.connect() as conn:
        got = dict(conn.execute(sa.select(table.c.id, table.c.ratio)).all())
    assert got == {0: 1.25, 1: 2.0, 2: 1.25, 3: 2.0}


@pytest.mark.postgresql
def test_too_long_string_is_an_error_not_truncated(pg_db: DB) -> None:
    table = make_table(pg_db)
    long = "c" * 30  # code is VARCHAR(20)
    pg_db.insert(table, {"id": 1, "code": long[:20], "weird": 0})
    flush = SQLAlchemyFlush(pg_db.engine, {"items": table}, ledger=False)
    # As a filter it must not match the row holding its first 20 characters...
    flush(batch(up("items", {"code": long}, columns={"weird": 1})))
    # ...and as a value it must fail like any other write, not be cut short.
    with pytest.raises(sa.exc.DataError, match="too long"):
        flush(batch(up("items", {"id": 1}, extra={"code": long})))
    with pg_db.engine.connect() as conn:
        assert conn.execute(sa.select(table.c.code, table.c.weird)).one() == (long[:20], 0)
