"""Flush throughput (rows/s): SQLAlchemyFlush vs one UPDATE per row in autocommit, same run.

The master process starts a throwaway PostgreSQL cluster (default durability settings: fsync,
synchronous_commit and full_page_writes on) and a SQLite file, creates the tables, and passes
both URLs to the pyperf workers. Each benchmark value is the time per row; rows/s = 1 / value.

    python plugins/updatebuffer-sqlalchemy/benchmarks/bench_flush.py -o flush.json
    python -m pyperf stats flush.json      # or: python -m pyperf dump flush.json

Scenarios (500-row batches, the buffers' default batch_size; rows ``times_seen += 1`` and
``last_seen = GREATEST(last_seen, now)``, Sentry's hot shape):

- ``pg-plugin-update``: ``SQLAlchemyFlush(ledger=True)``, one transaction per batch.
- ``pg-plugin-upsert``: the same with ``upsert=True``.
- ``pg-per-row-autocommit``: one ``UPDATE`` per row, each its own transaction (SQLAlchemy Core).
- ``pg-per-row-autocommit-psycopg``: the same through raw psycopg (the fastest per-row form).
- ``sqlite-plugin-update`` / ``sqlite-per-row-autocommit``: the same on a SQLite file.
"""

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import tempfile
import time
import uuid
from typing import Any

import pyperf
import sqlalchemy as sa
from updatebuffer import Batch, Update

from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger
from updatebuffer_sqlalchemy.testing import PostgresServer

BATCH = 500
TABLE_ROWS = 20_000
# Durable, like a production server: this is what makes one commit per row expensive.
PG_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "128MB",
}

metadata = sa.MetaData()
groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("times_seen", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
)
NOW = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def setup(url: str) -> None:
    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    create_ledger(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(groups), [{"id": i} for i in range(TABLE_ROWS)])
    engine.dispose()


_ids = itertools.count()


def next_rows() -> list[int]:
    """The next 500 distinct row ids, walking the whole table (no hot-row effects)."""
    start = (next(_ids) * BATCH) % TABLE_ROWS
    return list(range(start, start + BATCH))


def make_batch(ids: list[int]) -> Batch:
    # Shuffled order as a buffer hands it over; the plugin sorts.
    ordered = ids[::2] + ids[1::2]
    return Batch(
        [
            Update("groups", {"id": i}, columns={"times_seen": 1}, greatest={"last_seen": NOW})
            for i in ordered
        ],
        id=uuid.uuid4().hex,
    )


_engines: dict[str, sa.Engine] = {}


def engine_for(url: str, **kw: Any) -> sa.Engine:
    key = f"{url}|{sorted(kw.items())}"
    if key not in _engines:
        _engines[key] = sa.create_engine(url, **kw)
    return _engines[key]


def bench_plugin(loops: int, url: str, upsert: bool) -> float:
    flush = SQLAlchemyFlush(engine_for(url), {"groups": groups}, upsert=upsert)
    flush(make_batch(next_rows()))  # warm the statement caches and the pool
    batches = [make_batch(next_rows()) for _ in range(loops)]
    t0 = time.perf_counter()
    for batch in batches:
        flush(batch)
    return time.perf_counter() - t0


def bench_per_row(loops: int, url: str) -> float:
    engine = engine_for(url, isolation_level="AUTOCOMMIT")
    stmt = (
        sa.update(groups)
        .where(groups.c.id == sa.bindparam("b_id"))
        .values(
            times_seen=groups.c.times_seen + 1,
            last_seen=sa.func.greatest(groups.c.last_seen, sa.bindparam("b_ls"))
            if url.startswith("postgresql")
            else sa.func.coalesce(
                sa.func.max(groups.c.last_seen, sa.bindparam("b_ls")), sa.bindparam("b_ls")
            ),
        )
    )
    work = [next_rows() for _ in range(loops)]
    with engine.connect() as conn:
        conn.execute(stmt, {"b_id": 0, "b_ls": NOW})
        t0 = time.perf_counter()
        for ids in work:
            for i in ids:
                conn.execute(stmt, {"b_id": i, "b_ls": NOW})  # autocommit: one transaction each
        return time.perf_counter() - t0


def bench_per_row_psycopg(loops: int, url: str) -> float:
    import psycopg

    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    work = [next_rows() for _ in range(loops)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = (
            "UPDATE groups SET times_seen = times_seen + 1, "
            "last_seen = GREATEST(last_seen, %s) WHERE id = %s"
        )
        conn.execute(sql, (NOW, 0), prepare=True)
        t0 = time.perf_counter()
        for ids in work:
            for i in ids:
                conn.execute(sql, (NOW, i), prepare=True)
        return time.perf_counter() - t0


def add_cmdline_args(cmd: list[str], args: Any) -> None:
    cmd.extend(["--pg-url", args.pg_url, "--sqlite-url", args.sqlite_url])


def main() -> None:
    runner = pyperf.Runner(add_cmdline_args=add_cmdline_args)
    runner.argparser.add_argument("--pg-url", help="use this PostgreSQL instead of starting one")
    runner.argparser.add_argument("--sqlite-url")
    args = runner.parse_args()
    server: PostgresServer | None = None
    tmp: str | None = None
    if not args.worker:
        if not args.pg_url:
            server = PostgresServer(settings=PG_SETTINGS).start()
            args.pg_url = server.url
        if not args.sqlite_url:
            tmp = tempfile.mkdtemp(prefix="bench-flush-")
            args.sqlite_url = f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        setup(args.pg_url)
        setup(args.sqlite_url)
    pg, lite = args.pg_url, args.sqlite_url
    try:
        runner.bench_time_func("pg-plugin-update", bench_plugin, pg, False, inner_loops=BATCH)
        runner.bench_time_func("pg-plugin-upsert", bench_plugin, pg, True, inner_loops=BATCH)
        runner.bench_time_func("pg-per-row-autocommit", bench_per_row, pg, inner_loops=BATCH)
        runner.bench_time_func(
            "pg-per-row-autocommit-psycopg", bench_per_row_psycopg, pg, inner_loops=BATCH
        )
        runner.bench_time_func("sqlite-plugin-update", bench_plugin, lite, False, inner_loops=BATCH)
        runner.bench_time_func("sqlite-per-row-autocommit", bench_per_row, lite, inner_loops=BATCH)
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
