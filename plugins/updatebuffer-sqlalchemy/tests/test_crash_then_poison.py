"""A worker killed mid-batch, then a poison row in that batch: the ledger still applies each
healthy row once, and the poison row ends as a dead letter (Redis, SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
import updatebuffer

from updatebuffer_sqlalchemy import SQLAlchemyFlush, UnwritableUpdateError, create_ledger

if TYPE_CHECKING:
    from ubsa_helpers import DB

# Claims the batch and is SIGKILLed inside the callback, before writing anything.
CRASHING_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import updatebuffer

    def flush(batch):
        print("CB", len(batch), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    updatebuffer.from_url(sys.argv[1], flush=flush).process_pending()
    """
)


@pytest.mark.redis
@pytest.mark.faults
def test_crash_then_poison_row_applies_the_healthy_rows_once(db: DB) -> None:
    from updatebuffer.testing.servers import RedisServer, skip_or_fail_without_redis

    skip_or_fail_without_redis()
    groups = db.groups()
    create_ledger(db.engine)
    db.insert(groups, *({"id": i, "times_seen": 0} for i in range(50)))
    flush = SQLAlchemyFlush(db.engine, {"groups": groups})
    with RedisServer() as server:
        url = (
            f"{server.url}?delay=0&lease=0.3&partitions=1&max_attempts=3"
            "&retry_backoff=0.01&retry_backoff_max=0.02"
        )
        buf = updatebuffer.from_url(url, flush=flush)
        for i in range(50):
            buf.incr("groups", {"times_seen": i + 1}, {"id": i})
        buf.incr("groups", {"no_such_column": 1}, {"id": 99})  # the poison row
        worker = subprocess.run(
            [sys.executable, "-c", CRASHING_WORKER, url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert worker.returncode == -9 and worker.stdout.split() == ["CB", "51"], worker
        for _ in range(400):
            flushed = buf.drain()
            stats = buf.stats()
            if stats.in_flight_batches == 0:
                break
            if not flushed:
                time.sleep(0.02)  # the dead worker's lease has not expired yet
        letters = buf.dead_letters()  # type: ignore[attr-defined]  # DeadLetterStore
        buf.purge_dead_letters()  # type: ignore[attr-defined]  # DeadLetterStore
        buf.close()
    assert stats.in_flight_batches == 0 and stats.pending_rows == 0
    assert {i: r["times_seen"] for i, r in db.rows(groups).items()} == {i: i + 1 for i in range(50)}
    assert [letter.update.filters for letter in letters] == [{"id": 99}]
    assert UnwritableUpdateError.__name__ in letters[0].error
