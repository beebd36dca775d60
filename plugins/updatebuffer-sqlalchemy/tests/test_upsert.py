"""upsert=True: INSERT ... ON CONFLICT (filters) DO UPDATE, and which rows were created."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from ubsa_helpers import DB, batch, generic_engine, same_instant, ts, up

from updatebuffer_sqlalchemy import SQLAlchemyFlush, UnwritableUpdateError, create_ledger
from updatebuffer_sqlalchemy._writers import Writer

if TYPE_CHECKING:
    import sqlalchemy as sa


@pytest.fixture
def groups(db: DB) -> sa.Table:
    table = db.groups()
    create_ledger(db.engine)
    db.insert(table, {"id": 1, "times_seen": 10, "top": 5}, {"id": 5, "project_id": 1, "hash": "a"})
    return table


def test_upsert_creates_missing_rows_and_updates_existing(db: DB, groups: sa.Table) -> None:
    reports: list[list[bool]] = []
    flush = SQLAlchemyFlush(
        db.engine, {"groups": groups}, upsert=True, on_flushed=lambda u, c: reports.append(list(c))
    )
    flush(
        batch(
            up(filters={"id": 2}, columns={"times_seen": 3}, extra={"message": "new"}),
            up(filters={"id": 1}, columns={"times_seen": 1}, greatest={"top": 2}),
            up(filters={"id": 3}, greatest={"top": 7}, least={"bottom": 1}),
            up(filters={"id": 4}, columns={"times_seen": 1}, signal_only=True),
        )
    )
    rows = db.rows(groups)
    assert (rows[1]["times_seen"], rows[1]["top"]) == (11, 5)
    assert (rows[2]["times_seen"], rows[2]["message"]) == (3, "new")
    assert (rows[3]["times_seen"], rows[3]["top"], rows[3]["bottom"]) == (0, 7, 1)  # default 0
    assert 4 not in rows  # signal only
    assert reports == [[True, False, True, False]]  # batch order, aligned with the updates
    flush(batch(up(filters={"id": 2}, columns={"times_seen": 3})))
    assert db.rows(groups)[2]["times_seen"] == 6
    assert reports[-1] == [False]


def test_upsert_by_composite_unique_key(db: DB, groups: sa.Table) -> None:
    made: list[list[bool]] = []
    flush = SQLAlchemyFlush(
        db.engine, {"groups": groups}, upsert=True, on_flushed=lambda u, c: made.append(list(c))
    )
    # id is the primary key and has no default: the insert must name it, so the filters here
    # are the unique (project_id, hash) key and the id comes in through extra.
    flush(
        batch(
            up(filters={"project_id": 1, "hash": "a"}, columns={"times_seen": 2}, extra={"id": 5}),
            up(filters={"project_id": 1, "hash": "b"}, columns={"times_seen": 1}, extra={"id": 6}),
        )
    )
    rows = db.rows(groups)
    assert (rows[5]["times_seen"], rows[6]["times_seen"]) == (2, 1)
    assert made == [[False, True]]


def test_upsert_with_no_values_only_ensures_the_row(db: DB, groups: sa.Table) -> None:
    made: list[list[bool]] = []
    flush = SQLAlchemyFlush(
        db.engine, {"groups": groups}, upsert=True, on_flushed=lambda u, c: made.append(list(c))
    )
    flush(batch(up(filters={"id": 1}), up(filters={"id": 9})))
    rows = db.rows(groups)
    assert rows[1]["times_seen"] == 10
    assert rows[9]["times_seen"] == 0
    assert made == [[False, True]]


def test_upsert_datetimes_and_mixed_shapes(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, upsert=True)
    flush(
        batch(
            up(filters={"id": 7}, greatest={"last_seen": ts(2)}, least={"first_seen": ts(2)}),
            up(filters={"id": 8}, columns={"times_seen": 1}),
        )
    )
    flush(batch(up(filters={"id": 7}, greatest={"last_seen": ts(1)}, least={"first_seen": ts(1)})))
    row = db.rows(groups)[7]
    assert same_instant(row["last_seen"], ts(2))
    assert same_instant(row["first_seen"], ts(1))


def test_upsert_of_rows_the_database_merges(db: DB, groups: sa.Table) -> None:
    # Two buffer rows, one database row: a single multi-row ON CONFLICT statement would fail with
    # "cannot affect row a second time"; both deltas must land.
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, upsert=True)
    flush(
        batch(
            up(filters={"id": 20}, columns={"times_seen": 1}),
            up(filters={"id": "20"}, columns={"times_seen": 2}),
        )
    )
    assert db.rows(groups)[20]["times_seen"] == 3


def test_upsert_needs_a_unique_key_on_the_filters(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, upsert=True)
    with pytest.raises(UnwritableUpdateError, match=r"no primary key or unique constraint") as info:
        flush(batch(up(filters={"hash": "a"}, columns={"times_seen": 1})))
    assert info.value.field == "filters"
    with pytest.raises(UnwritableUpdateError, match=r"upsert cannot match NULL"):
        flush(batch(up(filters={"project_id": 1, "hash": None}, columns={"times_seen": 1})))


def test_generic_writer_upsert_on_a_real_database(db: DB, groups: sa.Table) -> None:
    # The fallback for dialects without a fast path (UPDATE, then INSERT when nothing matched),
    # run as deployed: the engine's dialect is one SQLAlchemyFlush has no fast path for (the
    # real SQLite/PostgreSQL driver under another dialect name, as MySQL or MSSQL would be), so
    # the flush picks the generic writer (and the generic ledger) itself.
    engine = generic_engine(db.engine)
    try:
        assert engine.dialect.name not in ("sqlite", "postgresql")
        made: list[list[bool]] = []
        flush = SQLAlchemyFlush(
            engine, {"groups": groups}, upsert=True, on_flushed=lambda u, c: made.append(list(c))
        )
        assert type(flush._writer) is Writer  # what writer_for() chose for this dialect
        updates = batch(
            up(filters={"id": 1}, columns={"times_seen": 1}, greatest={"top": 9}),
            up(filters={"id": 30}, columns={"times_seen": 4}, least={"bottom": 3}),
        )
        flush(updates)
        flush(updates)  # the same batch id again: the generic ledger skips it
        rows = db.rows(groups)
        assert (rows[1]["times_seen"], rows[1]["top"]) == (11, 9)
        assert (rows[30]["times_seen"], rows[30]["bottom"]) == (4, 3)
        assert made == [[False, True]]
    finally:
        engine.dispose()
