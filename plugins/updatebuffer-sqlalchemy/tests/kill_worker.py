"""A flush worker for the kill test: ``python kill_worker.py REDIS_URL PG_URL MODE``.

MODE ``die``: SIGKILL itself right after the first batch's transaction commits, before the buffer
acknowledges it (the batch stays leased in Redis and is redelivered to the next worker).
MODE ``run``: flush until the parent kills it. MODE ``drain``: flush until nothing is left, exit 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa
import updatebuffer
from updatebuffer import Update

from updatebuffer_sqlalchemy import SQLAlchemyFlush

if TYPE_CHECKING:
    from collections.abc import Sequence


def main() -> None:
    redis_url, pg_url, mode = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    engine = sa.create_engine(pg_url)
    groups = sa.Table("groups", sa.MetaData(), autoload_with=engine)  # reflected: PK included

    def committed(updates: Sequence[Update], created: Sequence[bool]) -> None:
        # on_flushed runs after COMMIT and only for a batch really written (not one the ledger
        # skipped): dying here is "after the commit, before the buffer's ack".
        print(f"committed {len(updates)} rows", file=sys.stderr, flush=True)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)

    flush = SQLAlchemyFlush(engine, {"groups": groups}, upsert=True, on_flushed=committed)
    buf = updatebuffer.from_url(redis_url, flush=flush)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        buf.process_pending()
        stats = buf.stats()
        if mode == "drain" and not (stats.pending_rows or stats.in_flight_batches):
            print("drained", file=sys.stderr, flush=True)
            return
        time.sleep(0.02)
    sys.exit("worker timed out")


if __name__ == "__main__":
    main()
