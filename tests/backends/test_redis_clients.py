"""How the Redis backend connects: URL forms, TLS, RESP versions, per-thread connections."""

import gc
import threading
import time
import warnings

import pytest

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import Recorder
from updatebuffer.testing.servers import RedisServer, skip_or_fail_without_redis

pytestmark = pytest.mark.redis


@pytest.fixture
def own_server():
    """A redis-server of this test's own: its connection count is no other test's business."""
    skip_or_fail_without_redis()
    with RedisServer() as server:
        yield server


def _connections(server):
    """Client connections the server holds, not counting the one asking."""
    return int(server.info("clients")["connected_clients"]) - 1


def _wait_for_connections(server, expected):
    """The server drops a closed client on its next event-loop turn: poll for the count."""
    deadline = time.monotonic() + 10
    while (n := _connections(server)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_finished_threads_close_their_connections_without_the_gc(own_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer.from_url(own_server.url, flush=rec, key_prefix=key_prefix, delay=0)
    buf.incr("g", {"n": 1}, {"id": 0})  # the main thread's connection stays open
    baseline = _connections(own_server)
    failures = []

    def produce(i):
        try:
            buf.incr("g", {"n": 1}, {"id": i % 7})
        except Exception as exc:
            failures.append(exc)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.disable()
        try:
            for start in range(0, 300, 30):  # at most 30 at once: a 2-core machine
                threads = [
                    threading.Thread(target=produce, args=(i,)) for i in range(start, start + 30)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            remaining = _wait_for_connections(own_server, baseline)
        finally:
            gc.enable()
        gc.collect()
    assert failures == []
    assert remaining == baseline
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert buf.drain() == 7 and rec.total("n") == 301
    buf.close()
    assert _wait_for_connections(own_server, 0) == 0
