"""The local window's lifecycle: exit without close(), close() while Redis is down, drain()."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import redis

import updatebuffer
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing import servers
from updatebuffer.testing.contract import Recorder

pytestmark = pytest.mark.redis


def _totals(updates) -> Counter:
    got: Counter = Counter()
    for u in updates:
        got[u.filters["id"]] += u.columns["n"]
    return got


def _flush_all(url: str, key_prefix: str) -> Counter:
    """Everything the buffer under *key_prefix* holds in Redis, delivered by a fresh buffer."""
    rec = Recorder()
    with updatebuffer.from_url(url, flush=rec, key_prefix=key_prefix, delay=0) as reader:
        reader.drain()
    return _totals(rec.updates())


_PRODUCER = """
import sys, updatebuffer

def flush(batch):
    raise AssertionError("never flushes here")

buf = updatebuffer.from_url({url!r}, flush=flush, key_prefix={prefix!r}, delay=3600,
                            local_window=3600)
for i in range(300):
    buf.incr("g", {{"n": 1}}, {{"id": i % 7}}, extra={{"i": i}})
{ending}
"""


@pytest.mark.parametrize(
    ("ending", "code"),
    [
        ("", 0),  # falls off the end of the script
        ("sys.exit(3)", 3),
        ("raise RuntimeError('unhandled')", 1),
    ],
    ids=["normal-exit", "sys-exit", "unhandled-exception"],
)
def test_exit_without_close_pushes_the_window(redis_server, key_prefix, ending, code):
    script = _PRODUCER.format(url=redis_server.url, prefix=key_prefix, ending=ending)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == code, done.stderr
    expected = Counter({i: len(range(i, 300, 7)) for i in range(7)})
    assert _flush_all(redis_server.url, key_prefix) == expected


def test_close_while_redis_is_down_raises_and_keeps_the_window(key_prefix):
    servers.skip_or_fail_without_redis()
    with servers.RedisServer() as server:
        rec = Recorder()
        buf = RedisBuffer(
            flush=rec,
            client=redis.Redis(host=server.host, port=server.port, socket_timeout=2),
            key_prefix=key_prefix,
            delay=3600,
            local_window=3600,
        )
        for i in range(50):
            buf.incr("g", {"n": 1}, {"id": i % 5})
        server.kill()
        with pytest.raises(updatebuffer.BackendError, match="5 local-window rows"):
            buf.close()
        with pytest.raises(updatebuffer.BackendError):  # still down: still refused, still kept
            buf.close()
        with pytest.raises(updatebuffer.UpdateBufferError, match="closed"):
            buf.incr("g", {"n": 1}, {"id": 0})
        server.start()
        buf.close()  # pushes the kept rows now
        buf.close()  # and is idempotent once it succeeded
        assert _flush_all(server.url, key_prefix) == {i: 10 for i in range(5)}


def test_drain_after_a_failed_close_pushes_and_flushes_the_window(key_prefix):
    servers.skip_or_fail_without_redis()
    with servers.RedisServer() as server:
        rec = Recorder()
        client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
        buf = RedisBuffer(
            flush=rec, client=client, key_prefix=key_prefix, delay=3600, local_window=3600
        )
        for i in range(50):
            buf.incr("g", {"n": 1}, {"id": i % 5})
        server.kill()
        with pytest.raises(updatebuffer.BackendError):
            buf.close()
        server.start()
        assert buf.drain() == 5
        assert _totals(rec.updates()) == {i: 10 for i in range(5)}
        buf.close()
        client.close()


def test_exit_without_close_while_redis_is_down_reports_the_lost_rows(key_prefix):
    # Nothing listens on the port: the exit push fails, and says so instead of losing silently.
    url = f"redis://127.0.0.1:{servers.free_port()}/0?socket_timeout=2"
    script = _PRODUCER.format(url=url, prefix=key_prefix, ending="")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "at exit, without close(): 7 local-window rows could not be pushed" in done.stderr


def test_get_includes_the_rows_not_yet_pushed(redis_server, key_prefix):
    """get() sees what the window holds, merged after what Redis holds, as it is delivered."""
    fail = [True]
    rec = Recorder()

    def flush(batch):
        if fail[0]:
            raise RuntimeError("down")
        rec(batch)

    with (
        updatebuffer.from_url(
            redis_server.url,
            flush=flush,
            key_prefix=key_prefix,
            delay=0,
            local_window=3600,
            retry_backoff=3600,
        ) as buf,
        updatebuffer.from_url(
            redis_server.url, flush=flush, key_prefix=key_prefix, delay=3600
        ) as other,
    ):
        buf.incr("g", {"n": 1, "f": 0.1}, {"id": 1}, extra={"e": "a"}, greatest={"t": 5})
        buf.drain()  # pushed, claimed, failed: in flight in Redis
        other.incr("g", {"n": 2}, {"id": 1}, greatest={"t": 9})  # pending in Redis
        buf.incr("g", {"n": 4, "f": 0.2}, {"id": 1}, extra={"e": "b"}, greatest={"t": 7})
        got = buf.get("g", {"id": 1})
        fail[0] = False
        buf.drain()
    assert got is not None
    assert dict(got.columns) == {"n": 7, "f": 0.1 + 0.2}
    assert dict(got.extra) == {"e": "b"}
    assert dict(got.greatest) == {"t": 9}
    assert got.count == 3
    assert sum(u.columns["n"] for u in rec.updates()) == 7


def test_stats_count_the_rows_not_yet_pushed(redis_server, key_prefix):
    rec = Recorder()
    with updatebuffer.from_url(
        redis_server.url, flush=rec, key_prefix=key_prefix, delay=3600, local_window=3600
    ) as buf:
        assert buf.stats().pending_rows == 0
        buf.incr("g", {"n": 1}, {"id": 1})
        buf.incr("g", {"n": 1}, {"id": 2})
        held = buf.stats()
        assert held.pending_rows == 2
        assert held.oldest_pending_age is not None
        assert buf.drain() == 2
        assert buf.stats().pending_rows == 0
    assert rec.total("n") == 2


_CHILD_MAKES_ITS_OWN = """
import multiprocessing, updatebuffer

def work(url, prefix):
    # The window is created in the child, which exits without close().
    buf = updatebuffer.from_url(url, flush=print, key_prefix=prefix, delay=3600, local_window=3600)
    for i in range(300):
        buf.incr("g", {{"n": 1}}, {{"id": i % 7}})

if __name__ == "__main__":
    ctx = multiprocessing.get_context({method!r})
    child = ctx.Process(target=work, args=({url!r}, {prefix!r}))
    child.start()
    child.join()
    raise SystemExit(child.exitcode)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_multiprocessing_child_pushes_a_window_it_created_at_exit(
    redis_server, key_prefix, method, tmp_path
):
    import multiprocessing

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    script = tmp_path / "child_makes_its_own.py"
    script.write_text(
        _CHILD_MAKES_ITS_OWN.format(method=method, url=redis_server.url, prefix=key_prefix)
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    expected = Counter({i: len(range(i, 300, 7)) for i in range(7)})
    assert _flush_all(redis_server.url, key_prefix) == expected
