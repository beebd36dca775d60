"""The applied-batches ledger: a redelivered batch is applied once."""

from __future__ import annotations

import datetime
import threading
import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
import updatebuffer
from ubsa_helpers import DB, batch, up

from updatebuffer_sqlalchemy import (
    DEFAULT_LEDGER_TABLE,
    SQLAlchemyFlush,
    create_ledger,
    ledger_table,
    prune_ledger,
)
from updatebuffer_sqlalchemy._ledger import claim

if TYPE_CHECKING:
    from updatebuffer import Batch


@pytest.fixture
def groups(db: DB) -> sa.Table:
    table = db.groups()
    create_ledger(db.engine)
    db.insert(table, {"id": 1, "times_seen": 0})
    return table


def ledger_ids(db: DB, name: str = DEFAULT_LEDGER_TABLE) -> list[str]:
    """The batch ids recorded, without their split markers (checked apart)."""
    return [i for i in ledger_entries(db, name) if not i.endswith("/split")]


def ledger_entries(db: DB, name: str = DEFAULT_LEDGER_TABLE) -> list[str]:
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
    assert ledger_entries(db) == []  # its split marker too


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
    flush: SQLAlchemyFlush,
    same: Batch,
    start: threading.Barrier | None,
    errors: list[BaseException],
) -> None:
    if start is not None:
        start.wait()
    try:
        flush(same)
    except BaseException as exc:  # pragma: no cover - reported by the test
        errors.append(exc)


def test_a_split_batch_is_skipped_when_its_parent_is_recorded(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(batch(up(columns={"times_seen": 5}), id="parent"))  # committed, reported as failed
    for child in ("parent.0", "parent.1", "parent.1.0"):
        flush(batch(up(columns={"times_seen": 5}), id=child))
    assert db.rows(groups)[1]["times_seen"] == 5
    assert ledger_ids(db) == ["parent"]  # the skipped children's inserts were rolled back
    flush(batch(up(columns={"times_seen": 1}), id="other.0"))  # no recorded ancestor
    flush(batch(up(columns={"times_seen": 1}), id="parent2"))  # not a child of "parent"
    assert db.rows(groups)[1]["times_seen"] == 7
    assert ledger_ids(db) == ["other.0", "parent", "parent2"]


class CommitThenRaise:
    """A host whose commit succeeds but is reported as failed (an error after the commit, a lost
    COMMIT reply), on every delivery: the buffer retries, splits and finally dead-letters."""

    def __init__(self, flush: SQLAlchemyFlush) -> None:
        self.flush = flush
        self.ids: list[str] = []

    def __call__(self, b: Batch) -> None:
        self.ids.append(b.id)
        self.flush(b)
        raise ConnectionError("server closed the connection after COMMIT")


def _commit_then_raise_through(db: DB, groups: sa.Table, url: str) -> CommitThenRaise:
    db.insert(groups, *({"id": i, "times_seen": 0} for i in range(2, 9)))
    host = CommitThenRaise(SQLAlchemyFlush(db.engine, {"groups": groups}))
    with updatebuffer.from_url(url, flush=host) as buf:
        for i in range(1, 9):
            buf.incr("groups", {"times_seen": i}, {"id": i})
        for _ in range(100):  # every attempt fails: retries, then splits down to single rows
            buf.drain()
            stats = buf.stats()
            if stats.in_flight_batches == 0:
                break
        letters = buf.dead_letters()  # type: ignore[attr-defined]  # DeadLetterStore
        buf.purge_dead_letters()  # type: ignore[attr-defined]  # nothing left for close()
    assert stats.pending_rows == 0 and stats.in_flight_batches == 0
    # Every row ends as a dead letter (its delivery never returned), yet was written once.
    assert sorted(letter.update.filters["id"] for letter in letters) == list(range(1, 9))
    assert {i: r["times_seen"] for i, r in db.rows(groups).items()} == {i: i for i in range(1, 9)}
    return host


def test_commit_then_raise_on_memory_applies_each_row_once_after_splits(
    db: DB, groups: sa.Table
) -> None:
    host = _commit_then_raise_through(
        db, groups, "memory://?batch_size=8&max_attempts=2&retry_backoff=0"
    )
    assert len(host.ids[0]) == 32 and host.ids.count(host.ids[0]) == 2
    assert f"{host.ids[0]}.1.0.1" in host.ids  # split down to single rows
    assert ledger_ids(db) == [host.ids[0]]


@pytest.mark.redis
def test_commit_then_raise_on_redis_applies_each_row_once_after_splits(
    db: DB, groups: sa.Table
) -> None:
    from updatebuffer.testing.servers import RedisServer, skip_or_fail_without_redis

    skip_or_fail_without_redis()
    with RedisServer() as server:
        host = _commit_then_raise_through(
            db,
            groups,
            f"{server.url}?delay=0&batch_size=8&max_attempts=2&retry_backoff=0&partitions=1",
        )
    assert f"{host.ids[0]}.1.0.1" in host.ids
    assert ledger_ids(db) == [host.ids[0]]


def test_a_parent_is_skipped_once_a_batch_split_from_it_applied(db: DB, groups: sa.Table) -> None:
    # A worker outlived its lease holding the whole batch; meanwhile the batch failed elsewhere,
    # was split, and a half was applied. The late worker must not apply the whole batch.
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    flush(batch(up(columns={"times_seen": 5}), id="p.1.0"))
    flush(batch(up(columns={"times_seen": 5}), id="p"))
    flush(batch(up(columns={"times_seen": 5}), id="p.1"))
    assert db.rows(groups)[1]["times_seen"] == 5
    assert ledger_entries(db) == ["p.1.0", "p.1.0/split", "p.1/split", "p/split"]
    flush(batch(up(columns={"times_seen": 1}), id="p.0"))  # a sibling still applies
    assert db.rows(groups)[1]["times_seen"] == 6


def _wait_for_a_blocked_backend(engine: sa.Engine) -> None:
    deadline = time.monotonic() + 60
    with engine.connect() as conn:
        while not conn.execute(
            sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")
        ).scalar_one():
            assert time.monotonic() < deadline, "the second flush never waited for the first"
            time.sleep(0.01)
            conn.rollback()


@pytest.mark.postgresql
@pytest.mark.parametrize(("first", "second"), [("p", "p.0"), ("p.0", "p")])
def test_a_parent_and_a_half_at_once_apply_their_rows_once(
    pg_db: DB, first: str, second: str
) -> None:
    groups = pg_db.groups()
    create_ledger(pg_db.engine)
    pg_db.insert(groups, {"id": 1, "times_seen": 0})
    flush = SQLAlchemyFlush(pg_db.engine, {"groups": groups})
    assert flush.ledger is not None
    errors: list[BaseException] = []
    with pg_db.engine.connect() as conn, conn.begin():
        # The first batch's transaction has claimed its ledger keys and is still open.
        assert claim(conn, flush.ledger, first)
        conn.execute(sa.update(groups).values(times_seen=groups.c.times_seen + 5))
        later = threading.Thread(
            target=_race,
            args=(flush, batch(up(columns={"times_seen": 5}), id=second), None, errors),
        )
        later.start()
        _wait_for_a_blocked_backend(pg_db.engine)
    later.join()
    assert errors == []
    assert pg_db.rows(groups)[1]["times_seen"] == 5
