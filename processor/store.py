"""A log partition's RocksDB plus the in-memory overlay of uncommitted writes.

RocksDB only ever holds committed state: the overlay collects the writes made
since the last commit; `commit()` writes them in one WriteBatch together with
the changelog offset they reflect (the checkpoint), after the Kafka
transaction carrying the same writes to the changelog has committed. Dropping
the overlay is therefore a complete rewind to the last commit.

While a commit is on its way the loop goes on: `freeze()` sets the
committing overlay aside (reads see it beneath the new one) and `commit()`
writes that one, so at most two overlays exist, and dropping both is again
a rewind to the last commit.

The WAL is on but not synced: a killed process keeps every batch it wrote
(the OS has it), so a restart after kill -9 restores only the changelog tail;
after an OS crash RocksDB recovers to a batch boundary, whose checkpoint is
consistent with it because it is in the same batch, and the changelog
supplies the rest. (Kafka Streams turns the WAL off and pays a longer
restore after a crash instead.)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from rocksdict import BlockBasedOptions, Options, Rdict, WriteBatch, WriteOptions

from oncely import schemas
from oncely.processor import keys

_CHECKPOINT = keys.META + b"checkpoint"
# A read cache of committed values, as Kafka Streams keeps one in front of
# RocksDB: the same keys are read again and again (a key's state at each of
# its records), and a RocksDB point read costs microseconds. Bounded per
# partition in entries and in value size; misses (None) are cached too.
CACHE_ENTRIES = 4096
CACHE_VALUE_BYTES = 512
_MISSING = object()


class PartitionStore:
    """State of one log partition: committed RocksDB + uncommitted overlay."""

    def __init__(self, path: Path, app: str, partitions: int, partition: int) -> None:
        self.path = Path(path)
        self.app = app
        self.partitions = partitions
        self.partition = partition
        self._db: Rdict | None = None
        self.overlay: dict[bytes, bytes | None] = {}
        self.frozen: dict[bytes, bytes | None] | None = None  # the overlay of the commit on its way
        # Keys put in this interval that the committed store does not hold:
        # deleting one again leaves nothing to write (net effects).
        self._fresh: set[bytes] = set()
        self.wiped = False
        self._cache: dict[bytes, bytes | None] = {}  # committed values (what RocksDB holds), oldest first
        self._key_states: dict[bytes, KeyState] = {}  # (key_state)

    # -- lifecycle --------------------------------------------------------------

    def _options(self) -> Options:
        opt = Options(raw_mode=True)
        opt.create_if_missing(True)
        opt.set_write_buffer_size(8 * 1024 * 1024)
        opt.set_max_write_buffer_number(3)
        # Bloom filters, in the memtable and in table files: most point reads
        # miss (the duplicate check of every Invoke with an idempotency key
        # looks an id up in four key spaces), and a miss that a filter
        # answers skips the search.
        opt.set_memtable_prefix_bloom_ratio(0.1)
        opt.set_memtable_whole_key_filtering(True)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        opt.set_block_based_table_factory(table)
        return opt

    def open(self) -> None:
        self._cache.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = Rdict(str(self.path), self._options())
        except Exception:
            # A store that cannot be opened cannot be trusted: rebuild it from
            # the changelog.
            self.wipe()
            return
        self._wo = WriteOptions()
        cp = self.checkpoint()
        if cp is not None and (cp["app"] != self.app or cp["partitions"] != self.partitions
                               or cp["partition"] != self.partition):
            self.wipe()

    def wipe(self) -> None:
        """Delete the local state entirely (it will be restored from the changelog)."""
        self._cache.clear()
        if self._db is not None:
            try:
                self._db.close()
            except Exception:
                pass
            self._db = None
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(self.path), self._options())
        self._wo = WriteOptions()
        self.drop_overlay()
        self.wiped = True

    def close(self) -> None:
        self._cache.clear()
        if self._db is not None:
            try:
                self._db.flush()
            finally:
                self._db.close()
                self._db = None

    @property
    def db(self) -> Rdict:
        assert self._db is not None, "store is closed"
        return self._db

    # -- reads --------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        ov = self.overlay
        if key in ov:
            return ov[key]
        fr = self.frozen
        if fr is not None and key in fr:
            return fr[key]
        cache = self._cache
        value = cache.get(key, _MISSING)
        if value is not _MISSING:
            return value  # type: ignore[return-value]
        db = self._db
        assert db is not None, "store is closed"
        value = db.get(key)
        if value is None or len(value) <= CACHE_VALUE_BYTES:
            if len(cache) >= CACHE_ENTRIES:
                del cache[next(iter(cache))]
            cache[key] = value
        return value

    def key_state(self, sk: bytes) -> KeyState:
        """The state of (service, key) `sk`, read through the overlays. Kept
        for the keys that come again (an invocation of a key makes one; most
        keys have many), a reader is immutable."""
        ks = self._key_states.get(sk)
        if ks is None:
            if len(self._key_states) >= CACHE_ENTRIES:
                self._key_states.clear()
            ks = self._key_states[sk] = KeyState(self, sk)
        return ks

    def committed_get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def scan(self, prefix: bytes, end: bytes | None = None,
             limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """Keys in [prefix, end) (default: all keys starting with prefix), the
        overlay applied, in key order; at most `limit` of them (the RocksDB
        range is read only as far as needed)."""
        stop = end if end is not None else keys.prefix_end(prefix)
        layers = (self.overlay,) if self.frozen is None else (self.frozen, self.overlay)
        merged = {k: v for layer in layers for k, v in layer.items() if k >= prefix and (stop is None or k < stop)}
        pending = sorted(merged.items())
        out: list[tuple[bytes, bytes]] = []
        i = 0
        n = len(pending)
        for k, v in self._db_range(prefix, stop):
            while i < n and pending[i][0] < k:
                if pending[i][1] is not None:
                    out.append(pending[i])  # type: ignore[arg-type]
                    if limit is not None and len(out) >= limit:
                        return out
                i += 1
            if i < n and pending[i][0] == k:
                k, v = pending[i]  # type: ignore[assignment]
                i += 1
                if v is None:
                    continue
            out.append((k, v))
            if limit is not None and len(out) >= limit:
                return out
        for k, v in pending[i:]:
            if v is not None:
                out.append((k, v))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def count_committed(self, prefix: bytes) -> int:
        """Committed keys under `prefix` (values not read)."""
        it = self.db.iter()
        it.seek(prefix)
        stop = keys.prefix_end(prefix)
        n = 0
        while it.valid() and (stop is None or it.key() < stop):
            n += 1
            it.next()
        return n

    def _db_range(self, start: bytes, stop: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        it = self.db.iter()
        it.seek(start)
        while it.valid():
            k = it.key()
            if stop is not None and k >= stop:
                break
            yield k, it.value()
            it.next()

    # -- writes -------------------------------------------------------------------

    def put(self, key: bytes, value: bytes) -> None:
        self.overlay[key] = value

    def put_fresh(self, key: bytes, value: bytes) -> None:
        """Put a key the caller knows the committed store does not hold."""
        ov = self.overlay
        if key not in ov:
            self._fresh.add(key)
        ov[key] = value

    def delete(self, key: bytes) -> None:
        if key in self._fresh:
            self._fresh.discard(key)
            self.overlay.pop(key, None)
        else:
            self.overlay[key] = None

    def has_changes(self) -> bool:
        """Writes since the last freeze (what the next commit must carry)."""
        return bool(self.overlay)

    def drop_overlay(self) -> None:
        """Back to RocksDB: both overlays go."""
        self.overlay = {}
        self.frozen = None
        self._fresh = set()

    def freeze(self) -> None:
        """The overlay is on its way to the changelog: set it aside, and
        collect the writes that follow in a new one."""
        assert self.frozen is None, "a commit is already on its way"
        self.frozen, self.overlay, self._fresh = self.overlay, {}, set()

    def commit(self, changelog_offset: int | None) -> None:
        """Write the frozen overlay (now committed to the changelog; the
        overlay itself when none was frozen) and the checkpoint in one batch."""
        if self.frozen is None:
            self.freeze()
        done, self.frozen = self.frozen, None
        wb = WriteBatch(raw_mode=True)
        for k, v in done.items():  # type: ignore[union-attr]
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
        if changelog_offset is not None:
            wb.put(_CHECKPOINT, self._encode_checkpoint(changelog_offset))
        if wb.len():
            self.db.write(wb, self._wo)
        cache = self._cache
        for k, v in done.items():  # type: ignore[union-attr]
            if k in cache:  # what RocksDB now holds
                if v is None or len(v) <= CACHE_VALUE_BYTES:
                    cache[k] = v
                else:
                    del cache[k]

    def apply_restored(self, records: Iterable[tuple[bytes, bytes | None]], next_offset: int) -> None:
        """Apply changelog records read during restore, with their checkpoint."""
        self._cache.clear()
        wb = WriteBatch(raw_mode=True)
        for k, v in records:
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
        wb.put(_CHECKPOINT, self._encode_checkpoint(next_offset))
        self.db.write(wb, self._wo)

    # -- checkpoint ---------------------------------------------------------------

    def _encode_checkpoint(self, offset: int) -> bytes:
        return schemas.encode("checkpoint", {
            "app": self.app, "partitions": self.partitions, "partition": self.partition,
            "changelog_offset": offset, "written_at_ms": int(time.time() * 1000),
        })

    def checkpoint(self) -> dict | None:
        raw = self.db.get(_CHECKPOINT)
        if raw is None:
            return None
        try:
            return schemas.decode("checkpoint", raw)
        except schemas.SchemaError:
            return None

    def is_empty(self) -> bool:
        it = self.db.iter()
        it.seek_to_first()
        return not it.valid()


class KeyState:
    """Committed state of one key, read through the overlay."""

    __slots__ = ("store", "prefix")

    def __init__(self, store: PartitionStore, sk: bytes) -> None:
        self.store = store
        self.prefix = keys.STATE + sk  # (keys.state_prefix) + a state name's UTF-8: its key (keys.state)

    def get(self, name: str) -> bytes | None:
        return self.store.get(self.prefix + name.encode())

    def names(self) -> list[str]:
        prefix = self.prefix
        return [k[len(prefix):].decode() for k, _ in self.store.scan(prefix)]
