"""Every merge operator against real SQLite and PostgreSQL (the ``db`` fixture runs both)."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from ubsa_helpers import DB, batch, same_instant, ts, up

from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger


@pytest.fixture
def groups(db: DB) -> sa.Table:
    table = db.groups()
    create_ledger(db.engine)
    db.insert(
        table,
        {"id": 1, "times_seen": 10, "users": None, "message": "old", "top": 5, "bottom": 5},
        {"id": 2, "times_seen": 0, "users": 3},
        {"id": 3, "times_seen": 7},
    )
    return table


def test_columns_add_deltas(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"id": 1}, columns={"times_seen": 5}),
            up(filters={"id": 2}, columns={"times_seen": 1, "users": 2}),
        )
    )
    rows = db.rows(groups)
    assert rows[1]["times_seen"] == 15
    assert (rows[2]["times_seen"], rows[2]["users"]) == (1, 5)
    assert rows[3]["times_seen"] == 7  # untouched


def test_delta_on_null_counter_starts_from_zero(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(batch(up(filters={"id": 1}, columns={"users": 4})))
    assert db.rows(groups)[1]["users"] == 4


def test_negative_and_float_deltas(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"id": 1}, columns={"times_seen": -3, "score": 1.5}),
            up(filters={"id": 2}, columns={"score": 2}),
            up(filters={"id": 3}, columns={"score": 0.25}),
        )
    )
    rows = db.rows(groups)
    assert rows[1]["times_seen"] == 7
    assert [rows[i]["score"] for i in (1, 2, 3)] == [1.5, 2.0, 0.25]


def test_extra_sets_values_including_null(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"id": 1}, extra={"message": None, "status": 2}),
            up(filters={"id": 2}, extra={"message": "new", "status": None}),
        )
    )
    rows = db.rows(groups)
    assert (rows[1]["message"], rows[1]["status"]) == (None, 2)
    assert (rows[2]["message"], rows[2]["status"]) == ("new", None)


def test_greatest_and_least_treat_null_as_absent(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            # row 1 has top=5, bottom=5: only a larger top / smaller bottom wins
            up(filters={"id": 1}, greatest={"top": 3}, least={"bottom": 9}),
            # row 2 has NULLs: the new value is taken (SQLite's max(NULL, x) would be NULL)
            up(filters={"id": 2}, greatest={"top": 3}, least={"bottom": 9}),
            up(filters={"id": 3}, greatest={"top": -1}, least={"bottom": -1}),
        )
    )
    flush(batch(up(filters={"id": 1}, greatest={"top": 8}, least={"bottom": 2})))
    rows = db.rows(groups)
    assert (rows[1]["top"], rows[1]["bottom"]) == (8, 2)
    assert (rows[2]["top"], rows[2]["bottom"]) == (3, 9)
    assert (rows[3]["top"], rows[3]["bottom"]) == (-1, -1)


def test_greatest_least_datetimes(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(batch(up(filters={"id": 1}, greatest={"last_seen": ts(5)}, least={"first_seen": ts(5)})))
    flush(batch(up(filters={"id": 1}, greatest={"last_seen": ts(3)}, least={"first_seen": ts(3)})))
    flush(batch(up(filters={"id": 1}, greatest={"last_seen": ts(9)}, least={"first_seen": ts(7)})))
    row = db.rows(groups)[1]
    assert same_instant(row["last_seen"], ts(9))
    assert same_instant(row["first_seen"], ts(3))


def test_signal_only_writes_nothing_but_reaches_on_flushed(db: DB, groups: sa.Table) -> None:
    seen: list[tuple[list[object], list[bool]]] = []
    flush = SQLAlchemyFlush(
        db.engine, {"groups": groups}, on_flushed=lambda u, c: seen.append((list(u), list(c)))
    )
    signal = up(filters={"id": 1}, columns={"times_seen": 100}, signal_only=True)
    real = up(filters={"id": 2}, columns={"times_seen": 1})
    flush(batch(signal, real))
    rows = db.rows(groups)
    assert rows[1]["times_seen"] == 10
    assert rows[2]["times_seen"] == 1
    assert seen == [([signal, real], [False, False])]


def test_only_signals_and_no_ledger_touch_nothing(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, ledger=False)
    flush(batch(up(filters={"id": 1}, columns={"times_seen": 1}, signal_only=True)))
    assert db.rows(groups)[1]["times_seen"] == 10


def test_rows_of_different_shapes_in_one_batch(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"id": 3}, columns={"times_seen": 1}),
            up(filters={"id": 1}, columns={"times_seen": 2}, extra={"message": "m1"}),
            up(filters={"id": 2}, greatest={"top": 4}),
            up(filters={"project_id": None, "hash": None}, extra={"status": 9}),  # IS NULL match
        )
    )
    rows = db.rows(groups)
    assert rows[3]["times_seen"] == 8
    assert (rows[1]["times_seen"], rows[1]["message"]) == (12, "m1")
    assert rows[2]["top"] == 4
    assert [rows[i]["status"] for i in (1, 2, 3)] == [9, 9, 9]


def test_composite_filters(db: DB, groups: sa.Table) -> None:
    db.insert(
        groups, {"id": 10, "project_id": 1, "hash": "a"}, {"id": 11, "project_id": 1, "hash": "b"}
    )
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"project_id": 1, "hash": "b"}, columns={"times_seen": 2}),
            up(filters={"project_id": 1, "hash": "a"}, columns={"times_seen": 1}),
            up(filters={"project_id": 2, "hash": "a"}, columns={"times_seen": 1}),  # no such row
        )
    )
    rows = db.rows(groups)
    assert (rows[10]["times_seen"], rows[11]["times_seen"]) == (1, 2)


def test_rows_the_buffer_keeps_apart_but_the_database_merges(db: DB, groups: sa.Table) -> None:
    # {"id": 1} and {"id": "1"} are two rows to the buffer but one row in an INTEGER column:
    # both deltas must land (a set-based UPDATE ... FROM would silently apply only one).
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(
        batch(
            up(filters={"id": 1}, columns={"times_seen": 1}),
            up(filters={"id": "1"}, columns={"times_seen": 2}),
        )
    )
    assert db.rows(groups)[1]["times_seen"] == 13


def test_missing_row_without_upsert_is_logged(
    db: DB, groups: sa.Table, caplog: pytest.LogCaptureFixture
) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    with caplog.at_level(logging.WARNING, logger="updatebuffer_sqlalchemy"):
        flush(
            batch(
                up(filters={"id": 1}, columns={"times_seen": 1}),
                up(filters={"id": 99}, columns={"times_seen": 1}),
            )
        )
    assert db.rows(groups)[1]["times_seen"] == 11
    assert 99 not in db.rows(groups)
    assert "1 of 2 'groups' rows matched no row" in caplog.text


def test_orm_class_with_attribute_names(db: DB) -> None:
    class Base(DeclarativeBase):
        metadata = db.metadata

    class Item(Base):
        __tablename__ = "items"
        pk: Mapped[int] = mapped_column("id", primary_key=True, autoincrement=False)
        hits: Mapped[int] = mapped_column("hit_count", default=0)
        label: Mapped[str | None] = mapped_column("label_text")

    db.metadata.create_all(db.engine)
    create_ledger(db.engine)
    db.insert(Item.__table__, {"id": 1, "hit_count": 1})  # type: ignore[arg-type]
    flush = SQLAlchemyFlush(db.engine, {"items": Item})
    flush(batch(up("items", {"pk": 1}, columns={"hits": 2}, extra={"label": "x"})))
    with db.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT hit_count, label_text FROM items")).one() == (3, "x")


def test_large_batch_of_many_rows(db: DB, groups: sa.Table) -> None:
    db.insert(groups, *({"id": i, "times_seen": 0} for i in range(100, 1100)))
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    updates = [up(filters={"id": i}, columns={"times_seen": i}) for i in range(1099, 99, -1)]
    flush(batch(*updates))
    rows = db.rows(groups)
    assert all(rows[i]["times_seen"] == i for i in range(100, 1100))
