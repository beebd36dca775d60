"""Tests for updatebuffer.testing.servers: real redis-server processes, reaped by pid."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys

import pytest
import redis
import redis.cluster

from updatebuffer.testing import servers
from updatebuffer.testing.servers import (
    RedisCluster,
    RedisNodes,
    RedisNotAvailableError,
    RedisServer,
    RedisStartupError,
    TLSFiles,
    free_port,
    skip_or_fail_without_redis,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def server():
    skip_or_fail_without_redis()
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def cluster():
    skip_or_fail_without_redis(cluster=True)
    with RedisCluster(masters=3) as clu:
        yield clu


# -- no server needed ----------------------------------------------------------------------------


def test_module_imports_without_redis_py_or_pytest():
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"  # any `import redis` now raises ImportError
        "sys.modules['pytest'] = None\n"
        "import updatebuffer.testing.servers\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})


def test_free_port_is_bindable_loopback_port():
    port = free_port()
    assert 0 < port <= 65535
    assert port != 6379
    assert _bindable(port)


def test_find_binaries_honour_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(servers.REDIS_SERVER_ENV, raising=False)
    monkeypatch.delenv(servers.REDIS_CLI_ENV, raising=False)
    real = servers.find_redis_server()
    if real is None:
        pytest.skip("redis-server is not installed")
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, real)
    assert servers.find_redis_server() == real
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, str(tmp_path / "no-such-redis-server"))
    assert servers.find_redis_server() is None
    monkeypatch.setenv(servers.REDIS_CLI_ENV, str(tmp_path / "no-such-redis-cli"))
    assert servers.find_redis_cli() is None


def test_missing_redis_server_raises_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(RedisNotAvailableError, match=servers.REDIS_SERVER_ENV):
        RedisServer().start()
    monkeypatch.delenv(servers.REDIS_SERVER_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisNotAvailableError, match="apt-get install redis-server"):
        RedisServer().start()


def test_skip_locally_fail_in_ci_without_redis(monkeypatch, tmp_path):
    monkeypatch.setenv(servers.REDIS_SERVER_ENV, str(tmp_path / "missing"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="UPDATEBUFFER_REDIS_SERVER"):
        skip_or_fail_without_redis()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_or_fail_without_redis()


def test_constructor_validation():
    with pytest.raises(ValueError, match="sequence of arguments"):
        RedisServer(extra_args="--maxmemory 1mb")
    with pytest.raises(ValueError, match="port"):
        RedisServer(port=70000)
    with pytest.raises(ValueError, match="at least 3 masters"):
        RedisCluster(masters=2)
    with pytest.raises(ValueError, match="at least one"):
        RedisNodes(0)


# -- single server -------------------------------------------------------------------------------


@pytest.mark.redis
def test_shared_server_answers_ping_set_get(server):
    assert server.host == "127.0.0.1"
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.port != 6379
    assert os.path.isdir(server.dir)
    with redis.Redis.from_url(server.url) as client:
        assert client.ping() is True
        assert client.set("greeting", "hello") is True
        assert client.get("greeting") == b"hello"
        assert client.info("server")["process_id"] == server.pid


@pytest.mark.redis
def test_raw_execute_and_info(server):
    assert server.execute("PING") == "PONG"
    assert server.execute("SET", "raw", b"\x00\xff") == "OK"
    assert server.execute("GET", "raw") == b"\x00\xff"
    assert server.execute("GET", "missing-key") is None
    assert server.execute("INCRBY", "counter", 5) == 5
    assert server.execute("MGET", "raw", "missing-key") == [b"\x00\xff", None]
    assert server.info("server")["process_id"] == str(server.pid)
    assert server.info("persistence")["aof_enabled"] == "0"
    with pytest.raises(RuntimeError, match="unknown command"):
        server.execute("NO-SUCH-COMMAND")


@pytest.mark.redis
def test_stop_reaps_process_frees_port_and_removes_dir():
    skip_or_fail_without_redis()
    srv = RedisServer().start()
    pid, port, directory = srv.pid, srv.port, srv.dir
    assert srv.running
    assert _pid_alive(pid)
    srv.stop()
    assert not srv.running
    assert not _pid_alive(pid)
    assert _refuses(port)
    assert _bindable(port)
    assert not os.path.exists(directory)
    with pytest.raises(RuntimeError, match="not running"):
        _ = srv.pid
    srv.stop()  # idempotent


@pytest.mark.redis
def test_restart_with_appendonly_keeps_data():
    skip_or_fail_without_redis()
    with RedisServer(appendonly=True) as srv:
        port, directory, old_pid = srv.port, srv.dir, srv.pid
        with redis.Redis.from_url(srv.url) as client:
            client.set("survivor", "yes")
            client.incrby("hits", 41)
        srv.restart()
        assert (srv.port, srv.dir) == (port, directory)
        assert srv.pid != old_pid
        assert not _pid_alive(old_pid)
        with redis.Redis.from_url(srv.url) as client:
            assert client.get("survivor") == b"yes"
            assert client.incr("hits") == 42


@pytest.mark.redis
def test_kill_refuses_connections_and_start_recovers_from_aof():
    skip_or_fail_without_redis()
    with RedisServer(appendonly=True) as srv:
        srv.execute("SET", "before-crash", "kept")
        pid, port, directory = srv.pid, srv.port, srv.dir
        srv.kill()
        assert not srv.running
        assert not _pid_alive(pid)
        assert _refuses(port)
        assert os.path.isdir(directory)  # kept for recovery
        srv.start()
        assert srv.port == port
        assert srv.execute("GET", "before-crash") == b"kept"
    assert not os.path.exists(directory)


@pytest.mark.redis
def test_explicit_port_in_use_is_refused_without_touching_owner(server):
    with pytest.raises(RedisStartupError, match="already in use"):
        RedisServer(port=server.port).start()
    assert server.execute("PING") == "PONG"


@pytest.mark.redis
def test_retries_on_another_port_when_the_chosen_one_is_taken(monkeypatch, server):
    # The first candidate port belongs to another (running) server: the new server must fail to
    # bind, notice that the PING came from someone else, and move to a fresh port.
    candidates = iter([server.port])
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: next(candidates, None) or real_free_port())
    srv = RedisServer()
    assert srv.port == server.port
    with srv:
        assert srv.port != server.port
        assert srv.pid != server.pid
        assert srv.info("server")["process_id"] == str(srv.pid)
    assert server.execute("PING") == "PONG"


@pytest.mark.redis
def test_startup_failure_reports_log_lines():
    skip_or_fail_without_redis()
    srv = RedisServer(extra_args=["--no-such-option", "1"])
    with pytest.raises(RedisStartupError, match="no-such-option"):
        srv.start()
    assert not srv.running


@pytest.mark.redis
def test_atexit_safety_net_kills_leftover_servers():
    skip_or_fail_without_redis()
    srv = RedisServer().start()
    pid, directory = srv.pid, srv.dir
    assert srv in servers._LIVE
    servers._cleanup_at_exit()
    assert not _pid_alive(pid)
    assert not os.path.exists(directory)
    assert srv not in servers._LIVE


# -- several servers -----------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_nodes_are_independent_servers():
    skip_or_fail_without_redis()
    with RedisNodes(2) as nodes:
        first, second = nodes.servers
        assert nodes.urls == [first.url, second.url]
        assert first.port != second.port
        assert first.pid != second.pid
        with (
            redis.Redis.from_url(first.url) as one,
            redis.Redis.from_url(second.url) as two,
        ):
            one.set("where", "first")
            assert one.get("where") == b"first"
            assert two.get("where") is None
        pids = [first.pid, second.pid]
    assert not any(map(_pid_alive, pids))


# -- cluster -------------------------------------------------------------------------------------


@pytest.mark.redis_cluster
def test_cluster_is_ok_on_every_node(cluster):
    assert len(cluster.servers) == 3
    assert cluster.startup_nodes == [("127.0.0.1", s.port) for s in cluster.servers]
    assert cluster.url == f"redis+cluster://127.0.0.1:{cluster.servers[0].port}"
    for node in cluster.servers:
        info = servers._parse_info(node.execute("CLUSTER", "INFO"))
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == "16384"
        assert info["cluster_known_nodes"] == "3"


@pytest.mark.redis_cluster
def test_cluster_client_spreads_keys_over_all_masters(cluster):
    host, port = cluster.startup_nodes[0]
    client = redis.cluster.RedisCluster(host=host, port=port)
    try:
        keys = [f"key:{i}" for i in range(100)]
        for i, key in enumerate(keys):
            assert client.set(key, i) is True
        assert [int(client.get(key)) for key in keys] == list(range(100))
        owners = {client.get_node_from_key(key).port for key in keys}
        assert owners == {s.port for s in cluster.servers}
    finally:
        client.close()
    # Cross-check with the servers themselves: every master holds some of the keys.
    counts = [node.execute("DBSIZE") for node in cluster.servers]
    assert sum(counts) == 100
    assert all(count > 0 for count in counts)


@pytest.mark.redis_cluster
@pytest.mark.slow
def test_cluster_with_replicas():
    skip_or_fail_without_redis(cluster=True)
    with RedisCluster(masters=3, replicas=1) as clu:
        roles = sorted(node.info("replication")["role"] for node in clu.servers)
        assert roles == ["master"] * 3 + ["slave"] * 3
        pids = [node.pid for node in clu.servers]
    assert not any(map(_pid_alive, pids))


def _ping(sock: socket.socket) -> bytes:
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    return sock.recv(64)


@pytest.mark.redis
def test_unixsocket_listens_in_the_servers_directory():
    skip_or_fail_without_redis()
    with RedisServer(unixsocket=True) as srv:
        path = srv.unix_socket_path
        assert path == os.path.join(srv.dir, "redis.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            assert _ping(sock) == b"+PONG\r\n"
    assert not os.path.exists(path)
    assert RedisServer().unix_socket_path is None


@pytest.mark.redis
def test_tls_port_speaks_tls_with_the_given_certificate(tmp_path):
    trustme = pytest.importorskip("trustme")
    skip_or_fail_without_redis()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    files = TLSFiles(
        str(tmp_path / "server.pem"), str(tmp_path / "server.pem"), str(tmp_path / "ca.pem")
    )
    with RedisServer(tls=files) as srv:
        assert srv.tls_port not in (None, srv.port)
        assert srv.tls_url == f"rediss://127.0.0.1:{srv.tls_port}/0"
        assert srv.execute("PING") == "PONG"  # the plain port stays open
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with (
            socket.create_connection((srv.host, srv.tls_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            assert _ping(sock) == b"+PONG\r\n"
    assert RedisServer().tls_url is None
