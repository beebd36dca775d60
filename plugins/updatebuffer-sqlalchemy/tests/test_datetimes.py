"""Aware datetimes on SQLite, which keeps no UTC offset: instants are stored and compared."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import pytest
from ubsa_helpers import UTC, batch, up

from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger

if TYPE_CHECKING:
    from ubsa_helpers import DB

PLUS2 = datetime.timezone(datetime.timedelta(hours=2))


def at(hour: int, tz: datetime.tzinfo) -> datetime.datetime:
    return datetime.datetime(2024, 1, 1, hour, tzinfo=tz)


def as_utc(value: object) -> datetime.datetime:
    # SQLite hands back naive datetimes; they must be the UTC instant that was written.
    assert isinstance(value, datetime.datetime) and value.tzinfo is None
    return value.replace(tzinfo=UTC)


@pytest.mark.parametrize("upsert", [False, True], ids=["update", "upsert"])
def test_greatest_and_least_compare_instants_across_batches(sqlite_db: DB, upsert: bool) -> None:
    groups = sqlite_db.groups()
    create_ledger(sqlite_db.engine)
    sqlite_db.insert(groups, {"id": 1, "times_seen": 0})
    flush = SQLAlchemyFlush(sqlite_db.engine, {"groups": groups}, upsert=upsert)
    # 10:00+02:00 is 08:00Z: earlier than 09:00Z although its wall clock is later.
    flush(batch(up(greatest={"last_seen": at(10, PLUS2)}, least={"first_seen": at(9, UTC)})))
    flush(batch(up(greatest={"last_seen": at(9, UTC)}, least={"first_seen": at(10, PLUS2)})))
    row = sqlite_db.rows(groups)[1]
    assert as_utc(row["last_seen"]) == at(9, UTC)
    assert as_utc(row["first_seen"]) == at(8, UTC)


def test_extra_datetime_is_stored_as_its_utc_instant(sqlite_db: DB) -> None:
    groups = sqlite_db.groups()
    create_ledger(sqlite_db.engine)
    flush = SQLAlchemyFlush(sqlite_db.engine, {"groups": groups}, upsert=True)
    flush(batch(up(extra={"last_seen": at(13, PLUS2)})))  # a new row: INSERT
    assert as_utc(sqlite_db.rows(groups)[1]["last_seen"]) == at(11, UTC)
    flush(batch(up(extra={"first_seen": at(13, PLUS2)})))  # an existing row: UPDATE
    assert as_utc(sqlite_db.rows(groups)[1]["first_seen"]) == at(11, UTC)
