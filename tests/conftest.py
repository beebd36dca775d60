import itertools

import pytest

from updatebuffer.testing import servers

_prefixes = itertools.count()


@pytest.fixture(scope="session")
def redis_server():
    servers.skip_or_fail_without_redis()
    with servers.RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_nodes():
    servers.skip_or_fail_without_redis()
    with servers.RedisNodes(2) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def redis_cluster():
    servers.skip_or_fail_without_redis(cluster=True)
    with servers.RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def key_prefix():
    """A fresh key prefix per test: tests share servers but never each other's keys."""
    return f"t{next(_prefixes)}"
