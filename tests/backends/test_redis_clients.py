"""How the Redis backend connects: URL forms, TLS, RESP versions, per-thread connections."""

import gc
import ssl
import threading
import time
import warnings
from urllib.parse import urlencode

import pytest
import redis

import updatebuffer
from updatebuffer.backends.redis import RedisBuffer
from updatebuffer.errors import BackendError, ConfigurationError
from updatebuffer.testing.contract import BufferContract, Recorder
from updatebuffer.testing.servers import (
    RedisCluster,
    RedisServer,
    TLSFiles,
    free_port,
    skip_or_fail_without_redis,
)

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


# -- RESP2 and RESP3 --------------------------------------------------------------------------


class _ProtocolContract(BufferContract):
    """The contract suite through an injected client speaking one RESP version."""

    concurrency = (8, 2500)
    protocol = 2

    @pytest.fixture
    def make_buffer(self, redis_server, key_prefix):
        client = redis.Redis(host=redis_server.host, port=redis_server.port, protocol=self.protocol)
        made = []

        def make(flush, **options):
            options.setdefault("delay", 0)
            made.append(RedisBuffer(flush=flush, client=client, key_prefix=key_prefix, **options))
            return made[-1]

        yield make
        for buf in made:
            buf.close()
        client.close()


class TestResp2(_ProtocolContract):
    protocol = 2


class TestResp3(_ProtocolContract):
    protocol = 3


def _resp_of_clients(server):
    """The RESP version of every client connection but the asking one: {id: resp}."""
    listing = server.execute("CLIENT", "LIST").decode()
    return [
        int(dict(f.split("=", 1) for f in line.split() if "=" in f)["resp"])
        for line in listing.splitlines()
        if "cmd=client|list" not in line
    ]


@pytest.mark.parametrize("protocol", [2, 3])
def test_url_protocol_reaches_every_connection_including_the_fast_path(
    own_server, key_prefix, protocol
):
    rec = Recorder()
    buf = RedisBuffer.from_url(
        f"{own_server.url}?protocol={protocol}", flush=rec, key_prefix=key_prefix, delay=0
    )
    buf.incr("g", {"n": 1}, {"id": 1})  # the fast path (one int column, one filter)
    buf.incr("g", {"n": 2, "m": 1.5}, {"id": 1})  # the general path, through the pool
    buf.incr("g", {"n": 1}, {"id": 2})
    assert len(buf._thread_conns) == 1  # the fast path ran, on its own connection
    assert buf.drain() == 2
    assert rec.total("n") == 4 and rec.total("m") == 1.5
    resp = _resp_of_clients(own_server)
    assert len(resp) == 2 and set(resp) == {protocol}  # thread connection + pool connection
    buf.close()


def test_protocol_option_is_typed(redis_server):
    for bad in ("1", "4", "x"):
        with pytest.raises(ConfigurationError, match="protocol"):
            RedisBuffer.from_url(f"{redis_server.url}?protocol={bad}", flush=Recorder())
    with pytest.raises(ConfigurationError, match="protocol"):
        RedisBuffer.from_url(redis_server.url, flush=Recorder(), protocol=True)


# -- redis+cluster:// where there is no cluster ----------------------------------------------


def test_cluster_url_without_a_cluster_is_one_backend_error(redis_server):
    for port, why in ((redis_server.port, "not enabled"), (free_port(), "onnect")):
        with pytest.raises(BackendError, match=why) as info:
            RedisBuffer.from_url(f"redis+cluster://127.0.0.1:{port}", flush=Recorder())
        assert "\n" not in str(info.value)
        assert f"127.0.0.1:{port}" in str(info.value)


# -- redis+unix:// ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_server():
    skip_or_fail_without_redis()
    with RedisServer(unixsocket=True) as server:
        yield server


@pytest.mark.parametrize("form", ["redis+unix://{path}", "redis+unix://localhost{path}"])
def test_unix_socket_urls(unix_server, key_prefix, form):
    path = unix_server.unix_socket_path
    url = form.format(path=path) + f"?db=3&key_prefix={key_prefix}&delay=0"
    rec = Recorder()
    buf = updatebuffer.from_url(url, flush=rec)
    for i in range(10):
        buf.incr("g", {"n": 1}, {"id": i % 2})
    buf.incr("g", {"n": 1, "x": 0.5}, {"id": 0})
    assert buf.drain() == 2 and rec.total("n") == 11
    # The buffer's two connections (fast path and pool), over the socket, on db 3.
    assert _clients_on(unix_server) == [(path, "3"), (path, "3")]
    buf.close()
    deadline = time.monotonic() + 10  # the server drops closed clients on its next loop turn
    while _clients_on(unix_server) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _clients_on(unix_server) == []


def _clients_on(server):
    """(socket, db) of every client connection but the asking (TCP) one."""
    listing = server.execute("CLIENT", "LIST").decode()
    fields = [dict(f.split("=", 1) for f in line.split()) for line in listing.splitlines()]
    return [(c["addr"].rsplit(":", 1)[0], c["db"]) for c in fields if c["cmd"] != "client|list"]


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("updatebuffer-test-client")
    files = {
        "ca": folder / "ca.pem",
        "server": folder / "server.pem",
        "client": folder / "client.pem",
        "other_ca": folder / "other-ca.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def tls_server(tls_files):
    """A TLS redis-server that requires a client certificate signed by the test's CA."""
    skip_or_fail_without_redis()
    tls = TLSFiles(tls_files["server"], tls_files["server"], tls_files["ca"])
    with RedisServer(tls=tls, extra_args=["--tls-auth-clients", "yes"]) as server:
        yield server


def _roundtrip(buf, rec):
    for i in range(10):
        buf.incr("g", {"n": 1}, {"id": i % 2})
    buf.incr("g", {"n": 1, "x": 0.5}, {"id": 0})
    assert buf.drain() == 2 and rec.total("n") == 11
    buf.close()


def test_rediss_with_private_ca_and_client_certificate_in_the_url(
    tls_server, tls_files, key_prefix
):
    query = urlencode(
        {
            "ssl_ca_certs": tls_files["ca"],
            "ssl_certfile": tls_files["client"],
            "ssl_keyfile": tls_files["client"],
            "ssl_cert_reqs": "required",
            "key_prefix": key_prefix,
            "delay": 0,
        }
    )
    rec = Recorder()
    _roundtrip(updatebuffer.from_url(f"{tls_server.tls_url}?{query}", flush=rec), rec)


def test_rediss_tls_options_as_keywords(tls_server, tls_files, key_prefix):
    rec = Recorder()
    buf = RedisBuffer.from_url(
        tls_server.tls_url,
        flush=rec,
        key_prefix=key_prefix,
        delay=0,
        ssl_ca_certs=tls_files["ca"],
        ssl_certfile=tls_files["client"],
        ssl_keyfile=tls_files["client"],
        ssl_cert_reqs=ssl.CERT_REQUIRED,
    )
    _roundtrip(buf, rec)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"ssl_ca_certs": "other_ca", "ssl_certfile": "client", "ssl_keyfile": "client"}, "certif"),
        ({"ssl_ca_certs": "ca"}, "rediss://"),  # the server requires a client certificate
    ],
)
def test_rediss_refused_handshake_is_a_backend_error(tls_server, tls_files, options, why):
    buf = RedisBuffer.from_url(
        tls_server.tls_url,
        flush=Recorder(),
        socket_timeout=2,
        **{k: tls_files[v] for k, v in options.items()},
    )
    with pytest.raises(BackendError, match=why):
        buf.incr("g", {"n": 1}, {"id": 1})
    buf.close()


def test_tls_options_need_rediss_and_the_urls_own_server(redis_server, tls_files):
    with pytest.raises(ConfigurationError, match="rediss://") as info:
        RedisBuffer.from_url(redis_server.url, flush=Recorder(), ssl_ca_certs=tls_files["ca"])
    assert info.value.option == "ssl_ca_certs"
    with pytest.raises(ConfigurationError, match="ssl_cert_reqs"):
        RedisBuffer.from_url("rediss://127.0.0.1:1?ssl_cert_reqs=maybe", flush=Recorder())
    client = redis.Redis(port=redis_server.port)
    with pytest.raises(ConfigurationError, match="injected"):
        RedisBuffer.from_url(
            "rediss://", flush=Recorder(), client=client, ssl_ca_certs=tls_files["ca"]
        )
    client.close()


@pytest.fixture(scope="module")
def tls_cluster(tls_files):
    skip_or_fail_without_redis(cluster=True)
    tls = TLSFiles(tls_files["server"], tls_files["server"], tls_files["ca"])
    with RedisCluster(masters=3, tls=tls) as cluster:
        yield cluster


@pytest.mark.redis_cluster
def test_rediss_cluster_with_private_ca(tls_cluster, tls_files, key_prefix):
    rec = Recorder()
    buf = updatebuffer.from_url(
        f"{tls_cluster.tls_url}?delay=0&key_prefix={key_prefix}",
        flush=rec,
        ssl_ca_certs=tls_files["ca"],
        ssl_cert_reqs="required",
    )
    # Every master is reached over TLS (the cluster tells a TLS client its nodes' TLS ports).
    nodes = buf._clients[0].get_nodes()
    assert sorted(n.port for n in nodes) == sorted(s.tls_port for s in tls_cluster.servers)
    for i in range(200):
        buf.incr("g", {"n": 1}, {"id": i % 40})
    buf.incr("g", {"n": 1, "x": 0.5}, {"id": 0})
    assert buf.drain() == 40 and rec.total("n") == 201
    assert all(s.execute("DBSIZE") > 0 for s in tls_cluster.servers)  # rows on every master
    buf.close()
    assert RedisCluster().tls_url is None
