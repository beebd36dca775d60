"""The plugin behind real buffers: memory with threads, and Redis with SIGKILLed workers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest
import updatebuffer

from updatebuffer_sqlalchemy import SQLAlchemyFlush, create_ledger

if TYPE_CHECKING:
    from ubsa_helpers import DB

HERE = os.path.dirname(os.path.abspath(__file__))


def test_memory_buffer_with_threads_gives_exact_totals(db: DB) -> None:
    groups = db.groups()
    create_ledger(db.engine)
    flush = SQLAlchemyFlush(db.engine, {"groups": groups}, upsert=True)
    expected: Counter[int] = Counter()
    lock = threading.Lock()
    buf = updatebuffer.from_url("memory://?delay=0.01&batch_size=50", flush=flush)

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        mine: Counter[int] = Counter()
        for _ in range(2000):
            row, n = rng.randrange(200), rng.randint(1, 3)
            buf.incr("groups", {"times_seen": n}, {"id": row}, greatest={"top": n})
            mine[row] += n
        with lock:
            expected.update(mine)

    with updatebuffer.Flusher(buf, interval=0.005):
        threads = [threading.Thread(target=produce, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    buf.close()
    rows = db.rows(groups)
    assert {i: r["times_seen"] for i, r in rows.items()} == dict(expected)
    assert sum(expected.values()) == sum(r["times_seen"] for r in rows.values())
    assert buf.stats().dead_letters == 0


def test_unknown_column_row_is_dead_lettered_and_the_rest_written(db: DB) -> None:
    # UnwritableUpdateError is an InvalidUpdateError about one row: the buffer splits the batch
    # and dead-letters only that row.
    groups = db.groups()
    create_ledger(db.engine)
    db.insert(groups, *({"id": i} for i in range(10)))
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    buf = updatebuffer.from_url(
        "memory://?batch_size=10&max_attempts=2&retry_backoff=0", flush=flush
    )
    for i in range(10):
        buf.incr("groups", {"times_seen": 1}, {"id": i})
    buf.incr("groups", {"times_sen": 1}, {"id": 99})  # typo: one bad row among good ones
    for _ in range(20):
        buf.drain()
    dead = buf.dead_letters()  # type: ignore[attr-defined]
    assert [d.update.columns for d in dead] == [{"times_sen": 1}]
    assert "times_sen" in dead[0].error
    assert [r["times_seen"] for r in db.rows(groups).values()] == [1] * 10
    buf.close()


@pytest.mark.redis
@pytest.mark.postgresql
@pytest.mark.faults
@pytest.mark.slow
def test_redis_worker_killed_after_commit_before_ack_counts_exactly(pg_db: DB) -> None:
    from updatebuffer.testing.servers import RedisServer, skip_or_fail_without_redis

    skip_or_fail_without_redis()
    groups = pg_db.groups()
    create_ledger(pg_db.engine)
    pg_url = pg_db.engine.url.render_as_string(hide_password=False)
    with RedisServer() as redis_server:
        url = f"{redis_server.url}?delay=0&lease=0.4&batch_size=40&retry_backoff=0.05"
        producer = updatebuffer.from_url(url, flush=lambda batch: None)  # incr only, never flushes
        expected: Counter[int] = Counter()
        rng = random.Random(4)
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                for _ in range(200):
                    row, n = rng.randrange(300), rng.randint(1, 5)
                    producer.incr("groups", {"times_seen": n}, {"id": row})
                    expected[row] += n
                time.sleep(0.01)

        def worker(mode: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, os.path.join(HERE, "kill_worker.py"), url, pg_url, mode],
                stderr=subprocess.PIPE,
                text=True,
            )

        logs: list[str] = []
        kills = {"after_commit": 0, "random": 0}
        thread = threading.Thread(target=produce)
        thread.start()
        try:
            for round_ in range(12):
                if round_ % 2 == 0:
                    # Killed by itself right after COMMIT, before the ack.
                    proc = worker("die")
                    _, err = proc.communicate(timeout=60)
                    assert proc.returncode == -9, err
                    kills["after_commit"] += 1
                else:
                    # Killed from outside at a random moment: mid-claim, mid-transaction, ...
                    proc = worker("run")
                    time.sleep(rng.uniform(0.8, 1.5))
                    proc.kill()
                    _, err = proc.communicate(timeout=60)
                    kills["random"] += 1
                logs.append(err)
        finally:
            stop.set()
            thread.join()
        proc = worker("drain")
        _, err = proc.communicate(timeout=120)
        logs.append(err)
        assert proc.returncode == 0, err
        producer.close()
    text = "\n".join(logs)
    rows = pg_db.rows(groups)
    # No loss and no double count, row by row.
    assert {i: r["times_seen"] for i, r in rows.items()} == dict(expected)
    # The ledger, not luck, made it exact: redelivered committed batches were skipped.
    # Each "die" round left one committed, unacknowledged batch that a later worker skipped.
    assert text.count("was already applied; skipping it") >= kills["after_commit"]
    assert kills == {"after_commit": 6, "random": 6}
