"""local_window: a row Redis refuses at push is kept whole, listed, and replayable.

The window merged and acknowledged these updates already, so a refusal at push time (a sum that
overflows across pushes, a type that cannot be compared with what Redis holds, a value that is out
of range by itself) must keep the row as a dead letter with all its data, never drop it.
"""

from __future__ import annotations

import math
import os

import pytest
import redis

from updatebuffer import BackendError, Batch, DeadLetter, Update
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.keys import encode_row
from updatebuffer.testing import servers
from updatebuffer.testing.contract import Recorder

pytestmark = pytest.mark.redis

# (what Redis holds for row g/1, what the window pushes on top, the refusal code in the error).
# A float sum leaving the double range across pushes is refused once lib.lua checks float sums
# exactly; its dead letter is written by the same code, tested on its own ("inf") below.
ACROSS_PUSHES = {
    "overflow": ({"columns": {"n": 2**63 - 1}}, {"columns": {"n": 5}}, "overflow on c:n"),
    "mixed-greatest": ({"greatest": {"t": 5}}, {"greatest": {"t": "late"}}, "mixed on G:t"),
    "mixed-least": ({"least": {"t": "a"}}, {"least": {"t": 1}}, "mixed on L:t"),
    "nonfinite": ({"columns": {"x": 1e308}}, {"columns": {"x": 1e308}}, "nonfinite on c:x"),
    "conflict": ({"greatest": {"t": 5}}, {"columns": {"t": 1}}, "conflict=g on c:t"),
}


def _buffers(redis_server, key_prefix, rec):
    client = redis.Redis(port=redis_server.port)
    plain = RedisBuffer(flush=rec, client=client, key_prefix=key_prefix, delay=3600)
    window = RedisBuffer(
        flush=rec, client=client, key_prefix=key_prefix, delay=3600, local_window=30
    )
    return client, plain, window


def _incr(buf, ops, **more):
    buf.incr(
        "g",
        {**ops.get("columns", {}), **more.get("columns", {})},
        {"id": 1},
        {**ops.get("extra", {}), **more.get("extra", {})},
        greatest=ops.get("greatest"),
        least=ops.get("least"),
    )


@pytest.mark.parametrize("case", sorted(ACROSS_PUSHES))
def test_row_refused_across_pushes_is_a_whole_replayable_dead_letter(
    redis_server, key_prefix, case
):
    held, pushed, reason = ACROSS_PUSHES[case]
    rec = Recorder()
    client, plain, window = _buffers(redis_server, key_prefix, rec)
    _incr(plain, held)
    _incr(window, pushed, columns={"k": 7}, extra={"m": "kept"})
    if case == "overflow":  # two updates merged in the window before the push
        _incr(window, pushed, columns={"k": 1}, extra={"m": "latest"})
    window.close()  # pushes the window: Redis refuses the merge, the row becomes a dead letter

    [letter] = plain.dead_letters()
    expected = Update(
        model="g",
        filters={"id": 1},
        columns={**pushed.get("columns", {}), "k": 7} if case != "overflow" else {"n": 10, "k": 8},
        extra={"m": "kept"} if case != "overflow" else {"m": "latest"},
        greatest=pushed.get("greatest", {}),
        least=pushed.get("least", {}),
        count=1 if case != "overflow" else 2,
        first_buffered=letter.update.first_buffered,
    )
    assert letter.update == expected
    assert reason in letter.error

    # Replayed while the conflicting data is still pending: refused again, kept, with the reason.
    assert plain.replay_dead_letters() == 0
    [again] = plain.dead_letters()
    assert again.update == expected and again.batch_id == letter.batch_id
    assert f"replay refused: {reason}" in again.error

    # Once the conflicting row is flushed, the replay merges and the row is delivered whole.
    assert plain.drain() == 1
    assert plain.replay_dead_letters() == 1
    assert plain.dead_letters() == []
    assert plain.drain() == 1
    delivered = rec.updates()[-1]
    assert delivered.columns == expected.columns and delivered.extra == expected.extra
    assert delivered.greatest == expected.greatest and delivered.least == expected.least
    assert delivered.count == expected.count
    plain.close()
    client.close()


@pytest.mark.parametrize(
    ("columns", "reason"),
    [({"n": 2**64, "k": 3}, "overflow on c:n"), ({"x": math.inf, "k": 3}, "nonfinite on c:x")],
    ids=["int-beyond-64-bit", "inf"],
)
def test_row_refused_on_its_own_is_kept_with_its_data(redis_server, key_prefix, columns, reason):
    # A pushed row whose own value Redis refuses (not a conflict with what Redis holds): the
    # dead letter must hold the row as pushed, not an empty record.
    rec = Recorder()
    client, plain, window = _buffers(redis_server, key_prefix, rec)
    row = Update(model="g", filters={"id": 1}, columns=columns, extra={"m": "kept"}, count=4)
    window._push(Batch([row], id="push1"))
    [letter] = plain.dead_letters()
    assert letter.update.columns == columns and letter.update.extra == {"m": "kept"}
    assert letter.update.count == 4 and reason in letter.error
    assert plain.replay_dead_letters() == 0  # refused again: it stays dead
    assert [dl.update for dl in plain.dead_letters()] == [letter.update]
    assert plain.stats().dead_letters == 1
    window.close()
    plain.close()
    client.close()


@pytest.mark.parametrize(
    "bad",
    [
        Update(model="g", filters={"id": -1}, columns={"bad\ud800": 1, "n": 2}),
        Update(model="g", filters={"id": -1}, columns={"n": 2}, greatest={"t\ud800": 1}),
        Update(model="g", filters={"id": -1}, columns={"n": 2}, extra={"m\ud800": "x"}),
    ],
    ids=["column-name", "greatest-name", "extra-name"],
)
def test_a_row_that_cannot_be_sent_blocks_no_other_row(redis_server, key_prefix, bad):
    rec = Recorder()
    client, plain, window = _buffers(redis_server, key_prefix, rec)
    good = [Update(model="g", filters={"id": i}, columns={"n": i}, count=2) for i in range(40)]
    # The unsendable row first: every partition group of the push comes after it.
    window._push(Batch([bad, *good], id="push1"))
    assert [plain.get("g", {"id": i}).columns for i in range(40)] == [{"n": i} for i in range(40)]
    [letter] = window.dead_letters()
    assert letter.update == bad and "UnicodeEncodeError" in letter.error
    assert window.stats().dead_letters == 1 and window.stats().dead_lettered == 1
    assert window.replay_dead_letters() == 0  # still cannot be sent: kept
    assert [dl.update for dl in window.dead_letters()] == [bad]
    window._push(Batch(good, id="push1"))  # the same push again: a duplicate, applied once
    assert plain.drain() == 40
    assert sorted(u.columns["n"] for u in rec.updates()) == list(range(40))
    assert window.purge_dead_letters() == 1
    assert window.dead_letters() == []
    window.close()
    plain.close()
    client.close()


def test_a_replayed_local_dead_letter_that_can_be_sent_reaches_redis(redis_server, key_prefix):
    rec = Recorder()
    client, plain, window = _buffers(redis_server, key_prefix, rec)
    row = Update(model="g", filters={"id": 1}, columns={"n": 3}, count=3)
    window._kept.letters.append(DeadLetter(row, "p.local", 0, "UnicodeEncodeError", 0.0))
    assert window.replay_dead_letters() == 1
    assert window.dead_letters() == []
    assert plain.get("g", {"id": 1}).columns == {"n": 3}
    window.close()
    plain.close()
    client.close()


def test_a_node_that_fails_a_push_blocks_no_other_node(key_prefix):
    servers.skip_or_fail_without_redis()
    rec = Recorder()
    with servers.RedisServer() as up, servers.RedisServer() as down:
        clients = [redis.Redis(port=up.port), redis.Redis(port=down.port)]
        window = RedisBuffer(
            flush=rec, client=clients, key_prefix=key_prefix, delay=3600, local_window=30
        )
        rows = [Update(model="g", filters={"id": i}, columns={"n": 1}) for i in range(40)]
        on_down = [
            u.filters["id"]
            for u in rows
            if window._locate("g", encode_row("g", u.filters))[0].node == 1
        ]
        assert 0 < len(on_down) < 40
        down.stop()
        with pytest.raises(BackendError):
            window._push(Batch(rows, id="push1"))
        plain = RedisBuffer(flush=rec, client=clients[0], key_prefix=key_prefix, delay=0)
        assert plain.drain() == 40 - len(on_down)  # node 0's rows were pushed all the same
        assert {u.filters["id"] for u in rec.updates()} == set(range(40)) - set(on_down)
        assert window._kept.letters == []  # nothing unsendable: the window retries the push
        plain.close()
        window.close()
        for c in clients:
            c.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_rows_kept_in_the_process_stay_with_the_parent_after_fork(redis_server, key_prefix):
    rec = Recorder()
    client, plain, window = _buffers(redis_server, key_prefix, rec)
    bad = Update(model="g", filters={"id": 1}, columns={"bad\ud800": 1})
    window._push(Batch([bad], id="push1"))
    kept = window._kept
    with kept.lock:  # held at fork time: the child must not inherit a locked lock
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 3
            try:
                # A copy of the parent's row would be replayed twice: the child has none.
                code = 0 if window._kept.lock.acquire(timeout=5) and not window._kept.letters else 1
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [dl.update for dl in window.dead_letters()] == [bad]
    window.close()
    plain.close()
    client.close()
