"""Redis unreachable (nothing listening) or hung (SIGSTOP): BackendError quickly, never a hang.

"Quickly" is checked loosely (a hang detector, not a benchmark): with ``socket_timeout=0.5`` a
call must fail well before ``HANG`` seconds, even on a loaded machine.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.errors import BackendError
from updatebuffer.testing import servers
from updatebuffer.testing.contract import Recorder

pytestmark = [pytest.mark.faults, pytest.mark.redis]

TIMEOUT = 0.5
HANG = 3.0  # 6x the socket timeout; a client retrying timeouts takes 5-10 s here


def _build(how, host, port, flush, prefix, **options):
    """The ways to give RedisBuffer its server: URL, Sentry-style hosts=, or a client.

    ``client`` is redis-py's default client; ``client-no-retry`` is one built with automatic
    retries off (``retry=Retry(NoBackoff(), 0)``).
    """
    options = {"key_prefix": prefix, "delay": 0, "socket_timeout": TIMEOUT, **options}
    if how == "url":
        return RedisBuffer.from_url(f"redis://{host}:{port}/0", flush=flush, **options)
    if how == "hosts":
        return RedisBuffer(flush=flush, hosts={0: {"host": host, "port": port}}, **options)
    more = {"retry": Retry(NoBackoff(), 0)} if how == "client-no-retry" else {}
    client = redis.Redis(
        host=host, port=port, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, **more
    )
    return RedisBuffer(flush=flush, client=client, **options)


def _fails_fast(call):
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < HANG, f"{call} took {elapsed:.1f} s to fail"
    return info.value


OPERATIONS = {
    "incr": lambda buf: buf.incr("g", {"n": 1}, {"id": 1}),
    "process_pending": lambda buf: buf.process_pending(),
    "drain": lambda buf: buf.drain(),
    "stats": lambda buf: buf.stats(),
    "get": lambda buf: buf.get("g", {"id": 1}),
    "dead_letters": lambda buf: buf.dead_letters(),
}

# redis-py >= 6 retries a command up to 10 times (exponential backoff up to 1 s) on a
# connection error or timeout unless the client is built with retries disabled; RedisBuffer
# talks through its own retry-free pool even when handed a client with the default policy.
HOW = ["url", "hosts", "client-no-retry", "client"]


# A refused connection fails fast even with retries (only the backoff adds up), so the default
# client is left out here: the hung-server tests below show its problem reliably.
@pytest.mark.parametrize("how", ["url", "hosts", "client-no-retry"])
def test_nothing_listening_then_server_comes_back(prefix, how):
    servers.skip_or_fail_without_redis()
    port = servers.free_port()
    rec = Recorder()
    buf = _build(how, "127.0.0.1", port, rec, prefix)
    for name, op in OPERATIONS.items():
        err = _fails_fast(lambda op=op: op(buf))
        assert isinstance(err.__cause__, redis.exceptions.ConnectionError), name
    # The server appears on that port: the very same buffer object works again.
    with servers.RedisServer(port=port):
        for k in range(30):
            buf.incr("g", {"n": 1, "v": k}, {"id": k % 3})
        assert buf.stats().pending_rows == 3
        assert buf.process_pending() == 3
        assert rec.total("n") == 30 and rec.total("v") == sum(range(30))
        buf.close()


@pytest.mark.parametrize("how", HOW)
def test_hung_server_times_out_then_recovers(server, prefix, how, freeze, make_tally):
    """SIGSTOP: connections are accepted by the kernel but never answered."""
    rec = Recorder()
    buf = _build(how, server.host, server.port, rec, prefix, lease=1)
    tally = make_tally()
    buf.incr("g", {"n": 1, "v": 1}, {"id": 1})  # warm: script loaded, connection pooled
    tally.ok("g:1", 1, 1)
    with freeze(server):
        _fails_fast(lambda: buf.incr("g", {"n": 1, "v": 10}, {"id": 1}))
        tally.err("g:1", 1, 10)  # sent before the timeout: it may still run when redis wakes
        for name, op in OPERATIONS.items():
            if name != "incr":
                err = _fails_fast(lambda op=op: op(buf))
                assert isinstance(err.__cause__, redis.exceptions.TimeoutError), name
    for k in range(20):
        buf.incr("g", {"n": 1, "v": 100}, {"id": k % 4})
        tally.ok(f"g:{k % 4}", 1, 100)
    deadline = time.monotonic() + 60
    while buf.stats().pending_rows or buf.stats().in_flight_batches:
        buf.drain()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    final = {}
    for u in rec.updates():
        key = f"g:{u.filters['id']}"
        c, n, v = final.get(key, (0, 0, 0))
        final[key] = (c + u.count, n + u.columns["n"], v + u.columns["v"])
    tally.check_bounds(final)
    buf.close()


def _incr_while_stalled(buf, server, freeze):
    """Call incr while *server* is frozen, thaw it a moment later; return (outcome, applied)."""
    buf.incr("g", {"n": 1}, {"id": 1})
    outcome = []

    def call():
        try:
            buf.incr("g", {"n": 1}, {"id": 1})
            outcome.append("ok")
        except BackendError:
            outcome.append("error")

    with freeze(server):
        t = threading.Thread(target=call)
        t.start()
        time.sleep(3 * TIMEOUT)  # the first timeout has fired; a retrying client is retrying
    t.join(timeout=60)
    assert not t.is_alive()
    time.sleep(0.2)
    pending = buf.get("g", {"id": 1})
    return outcome, pending.columns["n"]


@pytest.mark.parametrize("how", HOW)
def test_timed_out_incr_is_never_applied_twice(server, prefix, how, freeze):
    """An incr that *returns* counts once, even if Redis stalled while it was in flight.

    The server is frozen while incr waits for its reply and thawed a moment later. A client
    that re-sends the script after its timeout gets the first copy applied too (the server reads
    it from the dead connection when it wakes) and reports a single success: an over-count.
    """
    buf = _build(how, server.host, server.port, Recorder(), prefix)
    outcome, applied = _incr_while_stalled(buf, server, freeze)
    acked = 1 + (outcome == ["ok"])
    assert acked <= applied <= 2, (outcome, applied)
    buf.close()


@pytest.mark.redis_cluster
def test_timed_out_incr_is_never_applied_twice_on_a_cluster(cluster, prefix, freeze):
    buf = RedisBuffer.from_url(
        cluster.url, flush=Recorder(), key_prefix=prefix, delay=0, socket_timeout=TIMEOUT
    )
    buf.incr("g", {"n": 0}, {"id": 1})
    [owner] = [
        s
        for s in cluster.servers
        if s.execute("SCAN", "0", "MATCH", f"{prefix}:*", "COUNT", "10000")[1]
    ]
    outcome, applied = _incr_while_stalled(buf, owner, freeze)
    acked = 1 + (outcome == ["ok"])
    assert acked <= applied <= 2, (outcome, applied)
    buf.close()
