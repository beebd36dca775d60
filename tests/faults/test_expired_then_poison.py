"""A worker crash and a poison row in one batch: the healthy rows still get through.

A batch whose lease expired may have been applied by the dead worker, so it is redelivered
unchanged. Once a redelivery has run the callback and seen it raise, the batch fails for a reason
of its own: retry, split and dead letter resume, and a ledger that checks the batch lineage
applies the healthy rows exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from updatebuffer.backends.redis import RedisBuffer

pytestmark = [pytest.mark.faults, pytest.mark.redis]

POISON = 50

# Claims the batch and dies inside the callback, as a worker killed mid-batch does.
CRASHING_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from updatebuffer.backends.redis import RedisBuffer

    def flush(batch):
        print("CB", len(batch), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    buf = RedisBuffer.from_url(sys.argv[1], flush=flush, key_prefix=sys.argv[2], delay=0,
                               lease=float(sys.argv[3]), partitions=1)
    buf.process_pending()
    """
)


class LineageLedger:
    """An effectively-once host: skips a batch when its id or an ancestor's is recorded."""

    def __init__(self) -> None:
        self.applied: dict[str, list[int]] = {}
        self.deliveries: list[tuple[str, int]] = []
        self.poisoned: list[str] = []

    def __call__(self, batch) -> None:
        self.deliveries.append((batch.id, batch.attempt))
        ids = [u.filters["id"] for u in batch]
        if POISON in ids:
            self.poisoned.append(batch.id)
            raise ValueError("poison row")
        if not any(i in self.applied for i in batch.lineage):
            self.applied[batch.id] = ids


def test_expired_batch_with_a_poison_row_is_split_after_a_failed_redelivery(server, prefix):
    lease = 0.3
    ledger = LineageLedger()
    buf = RedisBuffer.from_url(
        server.url,
        flush=ledger,
        key_prefix=prefix,
        delay=0,
        lease=lease,
        partitions=1,
        max_attempts=3,
        retry_backoff=0.01,
        retry_backoff_max=0.02,
    )
    for i in range(51):  # 50 healthy rows and the poison row, in one batch
        buf.incr("g", {"n": i + 1}, {"id": i})
    worker = subprocess.run(
        [sys.executable, "-c", CRASHING_WORKER, server.url, prefix, str(lease)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode == -9 and worker.stdout.split() == ["CB", "51"], worker
    assert buf.stats().in_flight_batches == 1  # claimed by the dead worker, lease running

    for _ in range(400):
        flushed = buf.drain()
        stats = buf.stats()
        if stats.in_flight_batches == 0:
            break
        if not flushed:
            time.sleep(0.02)  # the dead worker's lease has not expired yet
    applied = Counter(i for ids in ledger.applied.values() for i in ids)
    assert applied == Counter(range(50)), ledger.deliveries
    assert stats.in_flight_batches == 0 and stats.pending_rows == 0
    [letter] = buf.dead_letters()
    assert letter.update.filters == {"id": POISON} and letter.update.columns == {"n": 51}
    assert "poison row" in letter.error
    root = ledger.deliveries[0][0]
    assert letter.batch_id.startswith(f"{root}.")  # isolated by splitting the expired batch
    buf.purge_dead_letters()
    buf.close()
