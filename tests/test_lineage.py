"""Split batch ids: the public rule a host's ledger relies on."""

import pytest

import updatebuffer
from updatebuffer import Batch, batch_lineage, child_batch_id


def test_children_carry_their_parents_id() -> None:
    assert child_batch_id("f3a9", 0) == "f3a9.0"
    assert child_batch_id("f3a9.0", 1) == "f3a9.0.1"
    with pytest.raises(ValueError, match="two halves"):
        child_batch_id("f3a9", 2)


def test_lineage_lists_the_id_then_its_ancestors_nearest_first() -> None:
    assert batch_lineage("f3a9.1.0") == ("f3a9.1.0", "f3a9.1", "f3a9")
    assert batch_lineage("f3a9") == ("f3a9",)
    # Only the split suffixes count: other dotted ids have no ancestors.
    assert batch_lineage("2024.01") == ("2024.01",)
    assert batch_lineage("a.10") == ("a.10",)
    assert Batch([], id="x.0.1").lineage == ("x.0.1", "x.0", "x")


def test_memory_split_ids_follow_the_rule() -> None:
    ids: list[str] = []

    def flush(batch: Batch) -> None:
        ids.append(batch.id)
        raise RuntimeError("down")

    buf = updatebuffer.from_url("memory://?max_attempts=1&retry_backoff=0", flush=flush)
    buf.incr("g", {"n": 1}, {"id": 1})
    buf.incr("g", {"n": 1}, {"id": 2})
    for _ in range(3):
        buf.drain()
    root = ids[0]
    assert ids == [root, child_batch_id(root, 0), child_batch_id(root, 1)]
    assert [letter.update.filters for letter in buf.dead_letters()] == [{"id": 1}, {"id": 2}]
    buf.purge_dead_letters()
    buf.close()
