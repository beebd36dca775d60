"""The applied-batches ledger: a redelivered batch is applied once."""

from __future__ import annotations

import datetime
import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from ubsa_helpers import DB, batch, up

from updatebuffer_sqlalchemy import (
    DEFAULT_LEDGER_TABLE,
    SQLAlchemyFlush,
    create_ledger,
    ledger_table,
    prune_ledger,
)

if TYPE_CHECKING:
    from updatebuffer import Batch


@pytest.fixture
def groups(db: DB) -> sa.Table:
    table = db.groups()
    create_ledger(db.engine)
    db.insert(table, {"id": 1, "times_seen": 0})
    return table


def ledger_ids(db: DB, name: str = DEFAULT_LEDGER_TABLE) -> list[str]:
    table = ledger_table(name=name)
    with db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(table.c.batch_id)).scalars())


def test_same_batch_twice_is_applied_once(db: DB, groups: sa.Table) -> None:
    calls: list[int] = []
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, on_flushed=lambda u, c: calls.append(1))
    first = batch(up(columns={"times_seen": 5}), id="batch-1")
    flush(first)
    flush(batch(up(columns={"times_seen": 5}), id="batch-1", attempt=2))  # redelivery
    assert db.rows(groups)[1]["times_seen"] == 5
    assert ledger_ids(db) == ["batch-1"]
    assert calls == [1]  # on_flushed ran for the commit, not for the skipped redelivery
    flush(batch(up(columns={"times_seen": 5}), id="batch-2"))
    assert db.rows(groups)[1]["times_seen"] == 10


def test_without_ledger_a_redelivery_applies_again(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, ledger=False)
    flush(batch(up(columns={"times_seen": 5}), id="b"))
    flush(batch(up(columns={"times_seen": 5}), id="b"))
    assert db.rows(groups)[1]["times_seen"] == 10


def test_custom_ledger_table_name(db: DB, groups: sa.Table) -> None:
    create_ledger(db.engine, "my_ledger")
    create_ledger(db.engine, "my_ledger")  # idempotent
    try:
        flush = SQLAlchemyFlush(db.engine, {"groups": groups}, ledger_table="my_ledger")
        flush(batch(up(columns={"times_seen": 1}), id="x"))
        flush(batch(up(columns={"times_seen": 1}), id="x"))
        assert ledger_ids(db, "my_ledger") == ["x"]
        assert ledger_ids(db) == []
        assert db.rows(groups)[1]["times_seen"] == 1
    finally:
        ledger_table(name="my_ledger").drop(db.engine)


def test_prune_ledger(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(batch(up(columns={"times_seen": 1}), id="old"))
    assert prune_ledger(db.engine, datetime.timedelta(hours=1)) == 0
    assert prune_ledger(db.engine, datetime.timedelta(seconds=-60)) == 1
    assert ledger_ids(db) == []


@pytest.mark.postgresql
def test_two_workers_with_the_same_batch_at_once_apply_it_once(pg_db: DB) -> None:
    # A lease that expired under a slow flush: two workers hold the same batch at the same time.
    groups = pg_db.groups()
    create_ledger(pg_db.engine)
    pg_db.insert(groups, *({"id": i, "times_seen": 0} for i in range(1, 51)))
    flush = SQLAlchemyFlush(pg_db.engine, {"groups": groups})
    for round_ in range(20):
        same = batch(
            *(up(filters={"id": i}, columns={"times_seen": 1}) for i in range(1, 51)),
            id=f"dup-{round_}",
        )
        start = threading.Barrier(4)
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=_race, args=(flush, same, start, errors)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
    assert {r["times_seen"] for r in pg_db.rows(groups).values()} == {20}


def _race(
    flush: SQLAlchemyFlush, same: Batch, start: threading.Barrier, errors: list[BaseException]
) -> None:
    start.wait()
    try:
        flush(same)
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)
