"""The store's read cache of committed values (processor/store.py): a read
after a commit, a rewind or a restore sees exactly what RocksDB holds."""

from __future__ import annotations

from pathlib import Path

from oncely.processor import store as store_module
from oncely.processor.store import PartitionStore


def _store(tmp_path: Path) -> PartitionStore:
    store = PartitionStore(tmp_path / "s", "app", 4, 1)
    store.open()
    return store


def test_cached_reads_follow_commits_rewinds_and_restores(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.put(b"sA", b"1")
    store.commit(1)
    assert store.get(b"sA") == b"1" and store.get(b"sB") is None  # both cached now (a miss too)
    store.put(b"sA", b"2")
    store.put(b"sB", b"2")
    store.freeze()
    store.commit(2)
    assert store.get(b"sA") == b"2", "a commit updates the cached value"
    assert store.get(b"sB") == b"2", "a commit replaces a cached miss"
    store.delete(b"sA")
    store.commit(3)
    assert store.get(b"sA") is None, "a commit's delete reaches the cache"
    store.put(b"sB", b"3")
    store.drop_overlay()  # a rewind
    assert store.get(b"sB") == b"2"
    store.apply_restored([(b"sB", b"9"), (b"sA", b"9")], 10)
    assert store.get(b"sA") == b"9" and store.get(b"sB") == b"9", "a restore empties the cache"
    store.close()
    store.open()
    assert store.get(b"sB") == b"9"
    store.close()


def test_the_cache_is_bounded_and_skips_large_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "CACHE_ENTRIES", 3)
    store = _store(tmp_path)
    big = b"x" * (store_module.CACHE_VALUE_BYTES + 1)
    store.put(b"big", big)
    for i in range(5):
        store.put(b"k%d" % i, b"%d" % i)
    store.commit(1)
    assert store.get(b"big") == big
    assert b"big" not in store._cache, "a value above CACHE_VALUE_BYTES is not kept"
    for i in range(5):
        assert store.get(b"k%d" % i) == b"%d" % i
    assert list(store._cache) == [b"k2", b"k3", b"k4"], "the oldest entries leave first"
    store.put(b"k4", big)
    store.commit(2)
    assert b"k4" not in store._cache and store.get(b"k4") == big
    store.close()
