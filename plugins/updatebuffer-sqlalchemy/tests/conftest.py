"""Real databases for the tests: a SQLite file per test and one throwaway PostgreSQL cluster.

PostgreSQL comes from ``UPDATEBUFFER_TEST_POSTGRES_URL`` when it is set; otherwise the session
starts a cluster with initdb/postgres on a free loopback port (never the machine's own server) and
stops it at the end. Without PostgreSQL binaries the PostgreSQL tests skip, or fail under CI=true.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from ubsa_helpers import DB

from updatebuffer_sqlalchemy.testing import (
    TEST_URL_ENV,
    PostgresServer,
    skip_or_fail_without_postgres,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get(TEST_URL_ENV)
    if url:
        yield url
        return
    skip_or_fail_without_postgres()
    with PostgresServer() as server:
        yield server.url


@pytest.fixture
def sqlite_db(tmp_path: os.PathLike[str]) -> Iterator[DB]:
    db = DB(sa.create_engine(f"sqlite:///{tmp_path}/test.db"))
    yield db
    db.drop()


@pytest.fixture
def pg_db(postgres_url: str) -> Iterator[DB]:
    db = DB(sa.create_engine(postgres_url, pool_size=10))
    # A previous test that died mid-way must not leave tables behind for this one.
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                "DROP TABLE IF EXISTS groups, items, events, updatebuffer_applied_batches CASCADE"
            )
        )
    yield db
    db.drop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def db(request: pytest.FixtureRequest) -> DB:
    """Each test that takes ``db`` runs once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")
