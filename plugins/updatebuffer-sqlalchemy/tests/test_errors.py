"""Bad updates fail before any write; a failure inside the transaction rolls everything back."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from ubsa_helpers import DB, batch, up
from updatebuffer import ConfigurationError, InvalidUpdateError, Update

from updatebuffer_sqlalchemy import SQLAlchemyFlush, UnwritableUpdateError, create_ledger
from updatebuffer_sqlalchemy.testing import PostgresServer


@pytest.fixture
def groups(db: DB) -> sa.Table:
    table = db.groups()
    create_ledger(db.engine)
    db.insert(table, {"id": 1, "times_seen": 1}, {"id": 2, "times_seen": 1})
    return table


class Statements:
    """Counts the statements an engine runs (real database, nothing mocked)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.seen: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        self.seen.append(statement)


def test_unknown_model_is_refused_before_any_statement(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    log = Statements(db.engine)
    with pytest.raises(UnwritableUpdateError, match=r"model 'grups' is not mapped") as info:
        flush(batch(up(columns={"times_seen": 1}), up("grups", {"id": 2}, columns={"x": 1})))
    err = info.value
    assert isinstance(err, InvalidUpdateError)
    assert isinstance(err, ValueError)
    assert (err.model, err.field) == ("grups", "model")
    assert "'groups'" in str(err)  # lists what is mapped
    assert log.seen == []
    assert db.rows(groups)[1]["times_seen"] == 1


@pytest.mark.parametrize(
    ("ops", "field"),
    [
        ({"columns": {"time_seen": 1}}, "columns['time_seen']"),
        ({"extra": {"mesage": "x"}}, "extra['mesage']"),
        ({"greatest": {"nope": 1}}, "greatest['nope']"),
        ({"least": {"nope": 1}}, "least['nope']"),
    ],
)
def test_unknown_column_is_refused_before_any_statement(
    db: DB, groups: sa.Table, ops: dict[str, dict[str, object]], field: str
) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    log = Statements(db.engine)
    with pytest.raises(UnwritableUpdateError, match=r"has no column") as info:
        flush(batch(up(columns={"times_seen": 1}), up(filters={"id": 2}, **ops)))
    assert info.value.field == field
    assert log.seen == []
    assert [r["times_seen"] for r in db.rows(groups).values()] == [1, 1]


def test_unknown_filter_column_and_conflicting_ops(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    with pytest.raises(UnwritableUpdateError, match=r"filters\['uid'\]"):
        flush(batch(up(filters={"uid": 1}, columns={"times_seen": 1})))
    with pytest.raises(UnwritableUpdateError, match=r"appears in both columns and extra"):
        flush(batch(up(columns={"times_seen": 1}, extra={"times_seen": 5})))
    with pytest.raises(UnwritableUpdateError, match=r"no filters"):
        # An UPDATE without WHERE would touch every row.
        flush(batch(Update(model="groups", filters={}, columns={"times_seen": 1})))


def test_database_error_rolls_back_the_whole_batch(db: DB, groups: sa.Table) -> None:
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    bad = batch(
        up(filters={"id": 1}, columns={"times_seen": 5}),
        up(filters={"id": 2}, columns={"times_seen": -10}),  # violates CHECK (times_seen >= 0)
        id="will-fail",
    )
    with pytest.raises(sa.exc.IntegrityError):
        flush(bad)
    assert [r["times_seen"] for r in db.rows(groups).values()] == [1, 1]
    # The ledger entry rolled back too, so the fixed redelivery is applied.
    flush(batch(up(filters={"id": 1}, columns={"times_seen": 5}), id="will-fail", attempt=2))
    assert db.rows(groups)[1]["times_seen"] == 6


def test_rollback_spans_models(db: DB, groups: sa.Table) -> None:
    events = sa.Table(
        "events",
        db.metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("n", sa.Integer, sa.CheckConstraint("n < 100"), nullable=False),
    )
    db.metadata.create_all(db.engine)
    db.insert(events, {"id": 1, "n": 0})
    flush = SQLAlchemyFlush(db.engine, {"groups": groups, "events": events})
    with pytest.raises(sa.exc.IntegrityError):
        # Models are written in name order: "events" fails after... no, before "groups"; the
        # point is that whichever part was written, none of it is kept.
        flush(batch(up(columns={"times_seen": 5}), up("events", {"id": 1}, columns={"n": 500})))
    assert db.rows(groups)[1]["times_seen"] == 1
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(events.c.n)).scalar_one() == 0


def test_construction_errors_are_configuration_errors(db: DB, groups: sa.Table) -> None:
    with pytest.raises(ConfigurationError, match="engine must be"):
        SQLAlchemyFlush("sqlite://", {"groups": groups})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="non-empty mapping"):
        SQLAlchemyFlush(db.engine, {})
    with pytest.raises(ConfigurationError, match=r"tables\['groups'\] must be"):
        SQLAlchemyFlush(db.engine, {"groups": "groups"})
    with pytest.raises(ConfigurationError, match="non-empty model names"):
        SQLAlchemyFlush(db.engine, {"": groups})
    with pytest.raises(ConfigurationError, match="ledger_table"):
        SQLAlchemyFlush(db.engine, {"groups": groups}, ledger_table="")
    with pytest.raises(ConfigurationError, match="on_flushed"):
        SQLAlchemyFlush(db.engine, {"groups": groups}, on_flushed=3)  # type: ignore[arg-type]


def test_on_flushed_error_is_logged_not_raised(
    db: DB, groups: sa.Table, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(updates: object, created: object) -> None:
        raise RuntimeError("hook failed")

    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, on_flushed=boom)
    flush(batch(up(columns={"times_seen": 1}), id="hooked"))
    assert db.rows(groups)[1]["times_seen"] == 2
    assert "on_flushed failed for committed batch hooked" in caplog.text


@pytest.mark.postgresql
def test_postgres_fast_path_is_one_statement_per_model(pg_db: DB) -> None:
    groups = pg_db.groups()
    create_ledger(pg_db.engine)
    pg_db.insert(groups, *({"id": i, "times_seen": 0} for i in range(1, 301)))
    flush = SQLAlchemyFlush(pg_db.engine, {"groups": groups})
    log = Statements(pg_db.engine)
    flush(batch(*(up(filters={"id": i}, columns={"times_seen": i}) for i in range(300, 0, -1))))
    writes = [s for s in log.seen if "groups" in s]
    assert len(writes) == 1 and "unnest" in writes[0]
    assert sum(r["times_seen"] for r in pg_db.rows(groups).values()) == sum(range(1, 301))


def test_postgres_server_lifecycle() -> None:
    from updatebuffer_sqlalchemy.testing import find_pg_bindir

    if find_pg_bindir() is None:
        pytest.skip("no PostgreSQL binaries")
    server = PostgresServer()
    server.start()
    directory = server._dir
    assert server.running and directory is not None
    engine = sa.create_engine(server.url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    engine.dispose()
    server.stop()
    server.stop()  # idempotent
    assert not server.running
    import os

    assert not os.path.exists(directory)


@pytest.mark.postgresql
def test_postgres_fast_upsert_is_one_statement_per_model(pg_db: DB) -> None:
    groups = pg_db.groups()
    create_ledger(pg_db.engine)
    pg_db.insert(groups, *({"id": i, "times_seen": 1} for i in range(1, 101)))
    made: list[list[bool]] = []
    flush = SQLAlchemyFlush(
        pg_db.engine, {"groups": groups}, upsert=True, on_flushed=lambda u, c: made.append(list(c))
    )
    log = Statements(pg_db.engine)
    flush(batch(*(up(filters={"id": i}, columns={"times_seen": 1}) for i in range(200, 0, -1))))
    writes = [s for s in log.seen if "groups" in s]
    assert len(writes) == 1 and "unnest" in writes[0] and "ON CONFLICT" in writes[0]
    assert made == [[i > 100 for i in range(200, 0, -1)]]
    rows = pg_db.rows(groups)
    assert [rows[i]["times_seen"] for i in (1, 100, 101, 200)] == [2, 2, 1, 1]
