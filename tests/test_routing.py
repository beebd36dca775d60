from __future__ import annotations

import hashlib
import sys
import zlib
from bisect import bisect_left

import pytest

from updatebuffer.errors import ConfigurationError, MissingDependencyError
from updatebuffer.routing import Crc32Router, KetamaRouter, PartitionRouter

REDIS_NODES = ["10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"]


def py2_signed_crc32(data: bytes) -> int:
    # Python 2's binascii.crc32 returned a signed 32-bit int; rb re-signs it the same way.
    crc = zlib.crc32(data)
    return crc - (1 << 32) if crc & 0x80000000 else crc


def reference_ketama(nodes: list[str], key: str) -> int:
    # libketama's continuum and lookup, written out independently of the router.
    ring: list[tuple[int, int]] = []
    for index, node in enumerate(nodes):
        for i in range(40):
            digest = hashlib.md5(f"{node}-{i}".encode()).digest()
            ring.extend(
                (int.from_bytes(digest[4 * h : 4 * h + 4], "little"), index) for h in range(4)
            )
    ring.sort()
    point = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
    position = bisect_left([p for p, _ in ring], point)
    return ring[position % len(ring)][1]


# (key, n_nodes, node): pinned placement. Keys whose Python-2 crc32 is negative are repeated
# with 3 and 7 nodes, where signed and unsigned crc32 disagree.
CRC32_VECTORS = [
    ("", 1, 0),
    ("a", 2, 1),  # crc32 = -390611389
    ("a", 3, 2),
    ("a", 7, 0),
    ("foo", 3, 1),  # crc32 = -1938594527
    ("foo", 7, 5),
    ("bar", 7, 0),
    ("sentry.group:42", 16, 15),
    ("sentry.group:42", 3, 0),
    ("sentry.group:42", 7, 3),
    ("user:12345", 1, 0),
    ("b:p:2c2d9a4e", 2, 1),
    ("ünïcödé", 3, 2),
    ("日本語キー", 7, 0),
    ("emoji-🎉", 16, 1),
    ("counter:project:1", 3, 1),
    ("counter:project:1", 7, 1),
    ("x" * 100, 2, 1),
    ("tsdb:1:2:3", 3, 2),
    ("tsdb:1:2:3", 7, 4),
    ("café", 3, 1),
    ("café", 7, 1),
    ("naïve-key", 16, 8),
    ("naïve-key", 7, 3),
    ("key-2", 3, 2),
    ("key-2", 7, 6),
    ("Ωmega", 7, 2),
    ("zzz", 16, 10),
    ("zzz", 3, 1),
]

KETAMA_KEYS = [
    "",
    "a",
    "foo",
    "bar",
    "sentry.group:42",
    "user:12345",
    "ünïcödé",
    "日本語キー",
    "emoji-🎉",
    "counter:project:1",
    "tsdb:1:2:3",
    "café",
    "key-0",
    "key-1",
    "key-2",
    "key-3",
    "key-4",
    "key-5",
    "zzz",
    "Ωmega",
]
KETAMA_REDIS_NODES_EXPECTED = [0, 2, 2, 2, 1, 1, 0, 2, 2, 2, 1, 1, 1, 1, 2, 2, 0, 0, 1, 2]
KETAMA_FOUR_NODES_EXPECTED = [2, 1, 3, 2, 3, 1, 0, 0, 1, 0, 0, 3, 3, 0, 2, 0, 0, 2, 3, 2]


# --- Crc32Router -------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "n_nodes", "expected"), CRC32_VECTORS)
def test_crc32_golden_vectors(key: str, n_nodes: int, expected: int) -> None:
    assert py2_signed_crc32(key.encode("utf-8")) % n_nodes == expected
    assert Crc32Router(n_nodes).get_node(key) == expected


def test_crc32_vectors_cover_signedness_and_non_ascii() -> None:
    negative = [k for k, n, _ in CRC32_VECTORS if py2_signed_crc32(k.encode()) < 0 and n in (3, 7)]
    assert negative
    # At least one vector where unsigned crc32 would place the key elsewhere.
    assert any(
        (zlib.crc32(k.encode()) % n) != expected for k, n, expected in CRC32_VECTORS if n in (3, 7)
    )
    assert any(not k.isascii() for k, _, _ in CRC32_VECTORS)
    assert {n for _, n, _ in CRC32_VECTORS} == {1, 2, 3, 7, 16}


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 7, 16])
def test_crc32_matches_reference_and_stays_in_range(n_nodes: int) -> None:
    router = Crc32Router(n_nodes)
    for i in range(2000):
        key = f"k:{i}:é"
        node = router.get_node(key)
        assert 0 <= node < n_nodes
        assert node == py2_signed_crc32(key.encode("utf-8")) % n_nodes


def test_crc32_attributes_and_repr() -> None:
    router = Crc32Router(7)
    assert router.n_nodes == 7
    assert repr(router) == "Crc32Router(n_nodes=7)"
    assert isinstance(router, PartitionRouter)


# --- KetamaRouter ------------------------------------------------------------------------------


def test_ketama_golden_vectors_named_nodes() -> None:
    router = KetamaRouter(REDIS_NODES)
    assert [router.get_node(k) for k in KETAMA_KEYS] == KETAMA_REDIS_NODES_EXPECTED
    assert [reference_ketama(REDIS_NODES, k) for k in KETAMA_KEYS] == KETAMA_REDIS_NODES_EXPECTED


def test_ketama_golden_vectors_node_count() -> None:
    router = KetamaRouter(4)
    assert [router.get_node(k) for k in KETAMA_KEYS] == KETAMA_FOUR_NODES_EXPECTED
    nodes = ["0", "1", "2", "3"]
    assert [reference_ketama(nodes, k) for k in KETAMA_KEYS] == KETAMA_FOUR_NODES_EXPECTED
    assert [KetamaRouter(nodes).get_node(k) for k in KETAMA_KEYS] == KETAMA_FOUR_NODES_EXPECTED


def test_ketama_agrees_with_uhashring() -> None:
    uhashring = pytest.importorskip("uhashring")
    ring = uhashring.HashRing(nodes=REDIS_NODES, hash_fn="ketama")
    router = KetamaRouter(REDIS_NODES)
    for i in range(5000):
        key = f"group:{i}"
        assert REDIS_NODES[router.get_node(key)] == ring.get_node(key)


def test_ketama_has_160_points_per_node() -> None:
    router = KetamaRouter(REDIS_NODES)
    assert len(router._points) == 160 * 3
    assert sorted(router._points) == router._points
    assert [router._owners.count(i) for i in range(3)] == [160, 160, 160]


def test_ketama_hash_equal_to_a_point_belongs_to_that_point() -> None:
    # libketama takes the first point >= the key's hash (uhashring's bisect takes the first >).
    router = KetamaRouter(REDIS_NODES)
    key = "sentry.group:42"
    point = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
    router._points = [point - 1, point, point + 1]
    router._owners = [0, 1, 2]
    assert router.get_node(key) == 1
    router._points = [point - 2, point - 1]
    router._owners = [2, 0]
    assert router.get_node(key) == 2  # past the last point: wrap to the first


def test_ketama_distribution_is_roughly_even() -> None:
    router = KetamaRouter(4)
    counts = [0, 0, 0, 0]
    for i in range(10_000):
        counts[router.get_node(f"key:{i}")] += 1
    for count in counts:
        assert 0.15 <= count / 10_000 <= 0.35, counts


def test_ketama_adding_a_node_moves_about_one_fifth() -> None:
    before = KetamaRouter(4)
    after = KetamaRouter(5)
    moved = 0
    for i in range(10_000):
        key = f"key:{i}"
        old, new = before.get_node(key), after.get_node(key)
        if old != new:
            moved += 1
            assert new == 4  # keys only ever move to the new node
    assert 0.10 <= moved / 10_000 <= 0.30, moved


def test_ketama_attributes_and_repr() -> None:
    router = KetamaRouter(REDIS_NODES)
    assert router.n_nodes == 3
    assert router.nodes == tuple(REDIS_NODES)
    assert repr(router) == f"KetamaRouter(nodes={REDIS_NODES!r})"
    assert repr(KetamaRouter(4)) == "KetamaRouter(nodes=4)"
    assert KetamaRouter(4).nodes == ("0", "1", "2", "3")
    assert isinstance(router, PartitionRouter)
    assert isinstance(KetamaRouter(("a",)), PartitionRouter)
    assert KetamaRouter(["only"]).get_node("anything") == 0


def test_ketama_missing_uhashring(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "uhashring", None)
    with pytest.raises(MissingDependencyError, match=r"updatebuffer\[ketama\]") as info:
        KetamaRouter(3)
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value.__cause__, ImportError)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, True, False, "3", 3.0, None])
def test_crc32_rejects_bad_n_nodes(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="n_nodes must be an int >= 1") as info:
        Crc32Router(bad)  # type: ignore[arg-type]  # the wrong type is the point
    assert isinstance(info.value, ValueError)
    assert info.value.option == "n_nodes"


@pytest.mark.parametrize("bad", [0, -1, True, 3.0, None, "3", b"ab", {"a": 1}])
def test_ketama_rejects_bad_nodes(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="nodes") as info:
        KetamaRouter(bad)  # type: ignore[arg-type]  # the wrong type is the point
    assert isinstance(info.value, ValueError)
    assert info.value.option == "nodes"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["a", "b", "a"], r"nodes\[2\] repeats the node identifier 'a'"),
        (["a", ""], r"nodes\[1\] must be a non-empty str"),
        (["a", 1], r"nodes\[1\] must be a non-empty str"),
        ([], "nodes is empty"),
    ],
)
def test_ketama_rejects_bad_node_ids(bad: list[object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        KetamaRouter(bad)  # type: ignore[arg-type]  # the wrong type is the point
    assert isinstance(info.value, ConfigurationError)
