"""A poison row among many on a 3-master Redis Cluster: isolated, dead-lettered, replayed."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.redis_cluster]

POISON = 137


def _per_row(rec):
    sums = defaultdict(lambda: [0, 0])
    for u in rec.updates():
        s = sums[u.filters["id"]]
        s[0] += u.columns["n"]
        s[1] += u.count
    return {k: tuple(v) for k, v in sums.items()}


def test_poison_row_is_isolated_dead_lettered_and_replayed(cluster, prefix, settle):
    rec = Recorder(poison=(("g", {"id": POISON}),))
    buf = RedisBuffer.from_url(
        cluster.url,
        flush=rec,
        key_prefix=prefix,
        delay=0,
        max_attempts=2,
        retry_backoff=0.01,
        retry_backoff_max=0.05,
        partitions=3,  # one partition per master: the poison row shares a big batch
        batch_size=500,
    )
    expected = defaultdict(lambda: [0, 0])
    for k in range(900):
        row = k % 300
        buf.incr("g", {"n": k}, {"id": row})
        expected[row][0] += k
        expected[row][1] += 1
    settle(buf)

    # Phase 1: every healthy row applied exactly once; the poison row only in dead letters.
    applied = Counter(u.filters["id"] for u in rec.updates())
    assert set(applied) == set(range(300)) - {POISON}
    assert set(applied.values()) == {1}
    assert rec.overlaps == []
    letters = buf.dead_letters()
    assert [dict(dl.update.filters) for dl in letters] == [{"id": POISON}]
    assert letters[0].update.columns == {"n": expected[POISON][0]}
    assert letters[0].update.count == 3
    assert "poisoned" in letters[0].error
    assert "." in letters[0].batch_id  # isolated by splitting the original batch
    stats = buf.stats()
    assert stats.dead_letters == 1 and stats.dead_lettered == 1 and stats.pending_rows == 0

    # Phase 2: the poison row keeps receiving updates; they fail alone and are dead-lettered too.
    buf.incr("g", {"n": 1000}, {"id": POISON})
    expected[POISON][0] += 1000
    expected[POISON][1] += 1
    settle(buf)
    assert buf.stats().dead_letters == 2
    # More updates stay pending (not flushed yet) when the fix lands.
    buf.incr("g", {"n": 5000}, {"id": POISON})
    buf.incr("g", {"n": 7}, {"id": 1})
    expected[POISON][0] += 5000
    expected[POISON][1] += 1
    expected[1][0] += 7
    expected[1][1] += 1

    # The host is fixed; replaying merges the dead letters back, before the newer pending data.
    rec.poison.clear()
    assert buf.replay_dead_letters() == 2
    assert buf.dead_letters() == []
    pending = buf.get("g", {"id": POISON})
    assert pending is not None and pending.columns == {"n": expected[POISON][0]}
    assert pending.count == expected[POISON][1]
    settle(buf)

    assert _per_row(rec) == {row: tuple(v) for row, v in expected.items()}
    stats = buf.stats()
    assert (stats.pending_rows, stats.in_flight_batches, stats.dead_letters) == (0, 0, 0)
    assert stats.dead_lettered == 2
    buf.close()
