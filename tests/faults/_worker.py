"""A flush worker process for the fault tests; the tests run it and SIGKILL it.

The flush callback is an effectively-once host: each batch is written to a SQLite ledger in one
transaction keyed by ``batch.id`` (a redelivered batch already in the ledger is skipped). Every
delivery is also logged, before anything else, with the worker's pid and monotonic timestamps.

It prints one line per event on stdout so the parent can time its kills::

    READY <pid>
    CB <batch id> <attempt>          the callback was entered (the delivery is logged)
    COMMITTED <batch id> <attempt>   the batch is in the ledger, not yet acknowledged to Redis
    DUP <batch id> <attempt>         the batch was already in the ledger: skipped
    SETTLED <rows flushed>           nothing pending or in flight any more (--settle)

Modes: without ``--settle`` it calls ``process_pending`` until killed (or until ``--stop-file``
appears); with ``--settle`` it then drains until Redis holds nothing pending or in flight and
exits 0. ``--pause-after-commit`` sleeps after every ledger commit, so a kill lands between the
commit and the ack.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import time

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.errors import BackendError


def emit(*words: object) -> None:
    print(*words, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--lease", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--pre", type=float, nargs=2, default=(0.0, 0.0), metavar=("MIN", "MAX"))
    p.add_argument("--post", type=float, nargs=2, default=(0.0, 0.0), metavar=("MIN", "MAX"))
    p.add_argument("--pause-after-commit", action="store_true")
    p.add_argument("--stop-file")
    p.add_argument("--settle", action="store_true")
    p.add_argument("--no-loop", action="store_true", help="settle right away")
    p.add_argument("--lifetime", type=float, default=240.0, help="safety net: exit after this")
    args = p.parse_args()

    pid = os.getpid()
    parent = os.getppid()
    rng = random.Random(pid)
    db = sqlite3.connect(args.ledger, timeout=120, isolation_level=None)
    db.execute("PRAGMA synchronous=NORMAL")

    started = time.monotonic()

    def expired() -> bool:
        # Never outlive the test: the parent died, or the safety lifetime is over.
        return os.getppid() != parent or time.monotonic() - started > args.lifetime

    def flush(batch) -> None:
        t_start = time.monotonic_ns()
        rows = [
            (
                f"{u.model}:{u.filters['id']}",
                int(u.columns.get("n", 0)),
                int(u.columns.get("v", 0)),
                u.count,
            )
            for u in batch
        ]
        cur = db.execute(
            "INSERT INTO deliveries (batch_id, attempt, pid, t_start, rows) VALUES (?, ?, ?, ?, ?)",
            (batch.id, batch.attempt, pid, t_start, " ".join(r[0] for r in rows)),
        )
        delivery = cur.lastrowid
        emit("CB", batch.id, batch.attempt)
        time.sleep(rng.uniform(*args.pre))
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM batches WHERE batch_id = ?", (batch.id,)).fetchone():
                outcome = "dup"
            else:
                db.execute(
                    "INSERT INTO batches (batch_id, attempt, pid) VALUES (?, ?, ?)",
                    (batch.id, batch.attempt, pid),
                )
                db.executemany(
                    "INSERT INTO batch_rows (batch_id, row, n, v, cnt) VALUES (?, ?, ?, ?, ?)",
                    [(batch.id, *r) for r in rows],
                )
                outcome = "applied"
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        emit("COMMITTED" if outcome == "applied" else "DUP", batch.id, batch.attempt)
        if args.pause_after_commit:
            while not expired():  # until the parent's SIGKILL lands between commit and ack
                time.sleep(0.05)
            os._exit(5)
        time.sleep(rng.uniform(*args.post))
        db.execute(
            "UPDATE deliveries SET t_end = ?, outcome = ? WHERE id = ?",
            (time.monotonic_ns(), outcome, delivery),
        )

    buf = RedisBuffer.from_url(
        args.url,
        flush=flush,
        key_prefix=args.prefix,
        delay=0,
        lease=args.lease,
        batch_size=args.batch_size,
        max_attempts=100_000,  # kills count as attempts: never split or dead-letter here
        retry_backoff=0.05,
        retry_backoff_max=0.2,
        socket_timeout=10,
    )
    emit("READY", pid)

    if not args.no_loop:
        while not (args.stop_file and os.path.exists(args.stop_file)):
            if expired():
                print("worker lifetime over", file=sys.stderr)
                return 3
            if buf.process_pending() == 0:
                time.sleep(0.01)
    if args.settle:
        flushed = 0
        while True:
            if expired():
                print(f"did not settle: {buf.stats()!r}", file=sys.stderr)
                return 4
            try:
                got = buf.drain()
                flushed += got
                stats = buf.stats()
            except BackendError as exc:
                print(f"retrying after {exc}", file=sys.stderr)
                time.sleep(0.1)
                continue
            if stats.pending_rows == 0 and stats.in_flight_batches == 0:
                break
            if not got:
                time.sleep(0.05)  # waiting for the lease of a killed worker's batch to expire
        emit("SETTLED", flushed)
    buf.close()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
