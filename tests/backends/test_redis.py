import os
import threading
import time

import pytest
import redis
import redis.cluster

import updatebuffer
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.testing.contract import BufferContract, Recorder
from updatebuffer.testing.servers import RedisServer, skip_or_fail_without_redis

pytestmark = pytest.mark.redis


def _maker(connect, key_prefix):
    made = []

    def make(flush, **options):
        options.setdefault("delay", 0)
        buf = RedisBuffer(flush=flush, client=connect(), key_prefix=key_prefix, **options)
        made.append(buf)
        return buf

    return make, made


class RedisContract(BufferContract):
    concurrency = (8, 2500)

    def connect(self, request):
        raise NotImplementedError

    @pytest.fixture
    def make_buffer(self, request, key_prefix):
        clients = []

        def connect():
            client = self.connect(request)
            clients.append(client)
            return client

        make, made = _maker(connect, key_prefix)
        yield make
        for buf in made:
            buf.close()
        for client in clients:
            if isinstance(client, list):
                for c in client:
                    c.close()
            else:
                client.close()


class TestSingleNode(RedisContract):
    def connect(self, request):
        server = request.getfixturevalue("redis_server")
        return redis.Redis(host=server.host, port=server.port)


class TestTwoNodes(RedisContract):
    def connect(self, request):
        nodes = request.getfixturevalue("redis_nodes")
        return [redis.Redis(host=s.host, port=s.port) for s in nodes.servers]


@pytest.mark.redis_cluster
class TestCluster(RedisContract):
    def connect(self, request):
        cluster = request.getfixturevalue("redis_cluster")
        host, port = cluster.startup_nodes[0]
        return redis.cluster.RedisCluster(host=host, port=port)


def test_from_url_single_node(redis_server, key_prefix):
    rec = Recorder()
    buf = updatebuffer.from_url(f"{redis_server.url}?delay=0&key_prefix={key_prefix}", flush=rec)
    assert type(buf) is RedisBuffer
    buf.incr("g", {"n": 1}, {"id": 1})
    assert buf.process_pending() == 1
    buf.close()
    buf.close()


def test_from_config_sentry_shape_spreads_rows_over_nodes(redis_nodes, key_prefix):
    rec = Recorder()
    hosts = {i: {"host": s.host, "port": s.port} for i, s in enumerate(redis_nodes.servers)}
    buf = updatebuffer.from_config(
        {"backend": "redis", "options": {"hosts": hosts, "delay": 0, "key_prefix": key_prefix}},
        flush=rec,
    )
    for i in range(200):
        buf.incr("g", {"n": 1}, {"id": i})
    per_node = {}
    for label, n in buf.stats().pending_by_partition.items():
        node = label.split("/")[0]
        per_node[node] = per_node.get(node, 0) + n
    assert set(per_node) == {"node0", "node1"} and all(n > 50 for n in per_node.values())
    assert buf.drain() == 200
    buf.close()


@pytest.mark.redis_cluster
def test_cluster_rows_spread_over_all_masters(redis_cluster, key_prefix):
    rec = Recorder()
    buf = updatebuffer.from_url(f"{redis_cluster.url}?delay=0&key_prefix={key_prefix}", flush=rec)
    for i in range(300):
        buf.incr("g", {"n": 1}, {"id": i})
    used = set()
    for server in redis_cluster.servers:
        client = redis.Redis(host=server.host, port=server.port)
        if any(client.scan_iter(match=f"{key_prefix}:*", count=1000)):
            used.add(server.port)
        client.close()
    assert len(used) == 3
    assert buf.drain() == 300
    assert rec.total("n") == 300
    buf.close()


def test_int64_overflow_is_rejected_and_row_kept(redis_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec, client=redis.Redis(port=redis_server.port), key_prefix=key_prefix, delay=0
    )
    buf.incr("g", {"a": 1, "n": 2**63 - 1}, {"id": 1})
    with pytest.raises(updatebuffer.InvalidUpdateError, match=r"columns\['n'\]") as info:
        buf.incr("g", {"a": 1, "n": 1}, {"id": 1})
    assert isinstance(info.value, ValueError)
    pending = buf.get("g", {"id": 1})
    assert pending.columns == {"a": 1, "n": 2**63 - 1} and pending.count == 1
    buf.drain()
    assert rec.updates()[0].columns == {"a": 1, "n": 2**63 - 1}
    buf.close()


def test_unreachable_server_raises_backend_error_quickly(key_prefix):
    from updatebuffer.testing.servers import free_port

    port = free_port()
    buf = updatebuffer.from_url(
        f"redis://127.0.0.1:{port}/0?socket_timeout=0.5&key_prefix={key_prefix}",
        flush=Recorder(),
    )
    with pytest.raises(updatebuffer.BackendError) as info:
        buf.incr("g", {"n": 1}, {"id": 1})
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    with pytest.raises(updatebuffer.BackendError):
        buf.process_pending()
    buf.close()


def test_password_is_masked(redis_server):
    buf = updatebuffer.from_url(
        f"redis://user:s3cret@127.0.0.1:{redis_server.port}/0", flush=Recorder()
    )
    assert "s3cret" not in repr(buf)
    with pytest.raises(updatebuffer.BackendError) as info:
        buf.incr("g", {"n": 1}, {"id": 1})
    assert "s3cret" not in str(info.value)
    buf.close()


def test_local_window_pushes_merged_rows(redis_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec,
        client=redis.Redis(port=redis_server.port),
        key_prefix=key_prefix,
        delay=0,
        local_window=0.05,
    )

    def produce():
        for i in range(5000):
            buf.incr("g", {"n": 1}, {"id": i % 100})

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    buf.drain()
    assert rec.total("n") == 20000
    assert buf.stats().updates_accepted == 20000
    buf.close()


def test_local_window_overflow_becomes_dead_letter(redis_server, key_prefix):
    rec = Recorder()
    client = redis.Redis(port=redis_server.port)
    plain = RedisBuffer(flush=rec, client=client, key_prefix=key_prefix, delay=3600)
    plain.incr("g", {"n": 2**63 - 1}, {"id": 1})
    buf = RedisBuffer(flush=rec, client=client, key_prefix=key_prefix, delay=3600, local_window=30)
    buf.incr("g", {"n": 5}, {"id": 1})
    buf.close()  # pushes the window: redis refuses the sum, the row is kept as a dead letter
    letters = plain.dead_letters()
    assert len(letters) == 1 and letters[0].update.columns == {"n": 5}
    assert "overflow" in letters[0].error
    plain.drain()
    assert rec.total("n") == 2**63 - 1
    assert plain.replay_dead_letters() == 1
    plain.drain()
    assert rec.total("n") == 2**63 - 1 + 5
    plain.close()


def test_fast_and_general_incr_paths_merge_into_one_row(redis_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec, client=redis.Redis(port=redis_server.port), key_prefix=key_prefix, delay=0
    )
    buf.incr("g", {"n": 1}, {"id": 7})  # fast path creates the row
    buf.incr("g", {"n": 2}, {"id": 7}, {"m": "x"}, signal_only=False)  # general path merges
    buf.incr("g", {"n": 3}, {"id": 7})  # fast path again
    buf.incr("g", {"n": 4}, {"id": "7"})  # another row (typed filters)
    pending = buf.get("g", {"id": 7})
    assert pending.columns == {"n": 6} and pending.count == 3 and pending.extra == {"m": "x"}
    assert pending.signal_only is False
    assert buf.drain() == 2
    assert sorted(u.columns["n"] for u in rec.updates()) == [4, 6]
    buf.close()


def test_fast_path_reloads_scripts_after_script_flush(redis_server, key_prefix):
    rec = Recorder()
    admin = redis.Redis(port=redis_server.port)
    buf = RedisBuffer(flush=rec, client=admin, key_prefix=key_prefix, delay=0)
    buf.incr("g", {"n": 1}, {"id": 1})
    admin.script_flush()  # as after a server restart without persistence of scripts
    buf.incr("g", {"n": 2}, {"id": 1})
    assert buf.drain() == 1
    assert rec.total("n") == 3
    buf.close()
    admin.close()


@pytest.mark.parametrize("window", [0, 30])
def test_greatest_beyond_float_range_is_compared_exactly(redis_server, key_prefix, window):
    rec = Recorder()
    buf = RedisBuffer(
        flush=rec,
        client=redis.Redis(port=redis_server.port),
        key_prefix=key_prefix,
        delay=0,
        local_window=window,
    )
    buf.incr("g", {"n": 1}, {"id": 1}, greatest={"t": 10**400}, least={"u": -(10**400)})
    buf.incr("g", {"n": 1}, {"id": 1}, greatest={"t": 5}, least={"u": 5})
    buf.incr("g", {"n": 1}, {"id": 1}, greatest={"t": 10**400 + 1}, least={"u": -(10**400) - 1})
    buf.drain()
    assert rec.updates()[0].greatest == {"t": 10**400 + 1}
    assert rec.updates()[0].least == {"u": -(10**400) - 1}
    buf.close()


def test_row_waits_while_its_older_data_is_in_flight(redis_server, key_prefix):
    client = redis.Redis(port=redis_server.port)
    later = Recorder()
    other = RedisBuffer(flush=later, client=client, key_prefix=key_prefix, delay=0)
    inside = []

    def flush(batch):
        # Newer data of the same row arrives while this batch is in flight; another worker
        # must leave it pending until this batch is acknowledged.
        other.incr("g", {"n": 10}, {"id": 1}, {"v": "new"})
        inside.append((other.process_pending(), other.get("g", {"id": 1})))

    buf = RedisBuffer(flush=flush, client=client, key_prefix=key_prefix, delay=0)
    buf.incr("g", {"n": 1}, {"id": 1}, {"v": "old"})
    assert buf.process_pending() == 1
    [(flushed_meanwhile, merged)] = inside
    assert flushed_meanwhile == 0
    assert merged.columns == {"n": 11} and merged.extra == {"v": "new"} and merged.count == 2
    assert other.process_pending() == 1
    assert [(u.columns, u.extra) for u in later.updates()] == [({"n": 10}, {"v": "new"})]
    assert other.get("g", {"id": 1}) is None
    buf.close()
    other.close()


def test_newer_data_of_a_dead_lettered_row_still_flows(redis_server, key_prefix):
    rec = Recorder()

    def flush(batch):
        if any(u.extra.get("v") == "bad" for u in batch):
            raise RuntimeError("refused")
        rec(batch)

    buf = RedisBuffer(
        flush=flush,
        client=redis.Redis(port=redis_server.port),
        key_prefix=key_prefix,
        delay=0,
        max_attempts=1,
        retry_backoff=0,
    )
    buf.incr("g", {"n": 1}, {"id": 1}, {"v": "bad"})
    buf.drain()  # fails once
    buf.drain()  # failed alone max_attempts times: dead letter
    assert buf.stats().dead_letters == 1
    buf.incr("g", {"n": 5}, {"id": 1}, {"v": "good"})
    assert buf.get("g", {"id": 1}).columns == {"n": 5}  # the dead letter is kept apart
    assert buf.drain() == 1
    assert [u.columns for u in rec.updates()] == [{"n": 5}]
    [letter] = buf.dead_letters()
    assert letter.update.columns == {"n": 1} and letter.update.extra == {"v": "bad"}
    buf.close()


def test_pending_member_without_row_is_dropped_not_fatal(redis_server, key_prefix):
    rec = Recorder()
    client = redis.Redis(port=redis_server.port)
    buf = RedisBuffer(flush=rec, client=client, key_prefix=key_prefix, delay=0, partitions=1)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.incr("g", {"n": 2}, {"id": 2})
    rows = [k for k in client.scan_iter(match=f"{key_prefix}:*:g:*") if b"~" not in k]
    assert len(rows) == 2
    client.delete(rows[0])  # e.g. deleted by hand: its pending member now points at nothing
    [(kept, n)] = [(i, buf.get("g", {"id": i})) for i in (1, 2) if buf.get("g", {"id": i})]
    assert buf.drain() == 1
    assert [(u.filters, u.columns) for u in rec.updates()] == [({"id": kept}, n.columns)]
    assert buf.stats().pending_rows == 0 and buf.stats().in_flight_batches == 0
    buf.close()


def _client_count(admin):
    return len(admin.client_list())


@pytest.fixture
def own_redis_server():
    """A redis-server of this test's own: its connection count is no other test's business."""
    skip_or_fail_without_redis()
    with RedisServer() as server:
        yield server


def test_fast_path_thread_connections_are_closed(own_redis_server, key_prefix):
    admin = redis.Redis(port=own_redis_server.port)
    alone = _client_count(admin)
    rec = Recorder()
    buf = RedisBuffer.from_url(own_redis_server.url, flush=rec, key_prefix=key_prefix, delay=0)
    buf.incr("g", {"n": 1}, {"id": 0})  # loads the script through the pool: no thread needs it
    baseline = _client_count(admin)

    def produce():
        for i in range(200):
            buf.incr("g", {"n": 1}, {"id": i % 5})

    threads = [threading.Thread(target=produce) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each producer thread had its own connection, closed when the thread ended (not when the
    # garbage collector gets to it).
    assert _wait_for_client_count(admin, baseline) == baseline
    assert buf.drain() == 5 and rec.total("n") == 601
    buf.close()
    assert _wait_for_client_count(admin, alone) == alone  # thread and pool connections closed
    admin.close()


def _wait_for_client_count(admin, expected):
    """The server drops a closed client on its next event-loop turn: poll for the count."""
    deadline = time.monotonic() + 10
    while (n := _client_count(admin)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def test_fast_path_reconnects_after_an_idle_connection_was_killed(redis_server, key_prefix):
    admin = redis.Redis(port=redis_server.port)
    rec = Recorder()
    buf = RedisBuffer.from_url(redis_server.url, flush=rec, key_prefix=key_prefix, delay=0)
    for i in range(20):
        buf.incr("g", {"n": 1}, {"id": i % 3})
        admin.client_kill_filter(_type="normal", skipme=True)  # e.g. the server's `timeout`
    assert buf.drain() == 3 and rec.total("n") == 20
    buf.close()
    admin.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_uses_its_own_fast_path_connection(redis_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer.from_url(redis_server.url, flush=rec, key_prefix=key_prefix, delay=0)
    buf.incr("g", {"n": 1}, {"id": 1})
    inherited = buf._thread_conn(0)
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            own = buf._thread_conn(0)
            for _ in range(50):
                buf.incr("g", {"n": 1}, {"id": 1})
            code = 0 if own is not inherited else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    buf.incr("g", {"n": 1}, {"id": 1})  # the parent's connection still works
    assert buf._thread_conn(0) is inherited
    assert buf.drain() == 1 and rec.total("n") == 52
    buf.close()


def test_drain_waits_for_a_local_window_push_in_progress(redis_server, key_prefix):
    rec = Recorder()
    buf = RedisBuffer.from_url(
        redis_server.url, flush=rec, key_prefix=key_prefix, delay=0, local_window=0.05
    )
    window = buf._window
    push, entered = window._flush, threading.Event()

    def slow_push(batch):
        entered.set()
        time.sleep(0.3)  # drain() below starts while the window's thread is in here
        push(batch)

    window._flush = slow_push
    for i in range(100):
        buf.incr("g", {"n": 1}, {"id": i % 10})
    assert entered.wait(5)
    assert buf.drain() == 10
    assert rec.total("n") == 100
    buf.close()
