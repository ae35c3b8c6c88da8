"""Restoring a partition's RocksDB from its changelog (processor/restore.py)
on a real broker, when the changelog's last stable offset lags the local
checkpoint: a transaction that began before the checkpoint is still open
there (our own last commit while the broker writes its markers, or a fenced
zombie's). The state up to the checkpoint is committed and applied; wiping
it and restoring to the last stable offset would lose the last commit's
state while its outputs and offsets stand."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import Producer, TopicPartition

from oncely.processor.restore import Restorer
from oncely.processor.store import PartitionStore
from oncely.testing import create_topic, unique_name


def _txn_producer(kafka: str, tid: str) -> Producer:
    p = Producer({"bootstrap.servers": kafka, "transactional.id": tid, "enable.idempotence": True})
    p.init_transactions(30)
    return p


def _committed(p: Producer, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    p.begin_transaction()
    for k, v in records:
        p.produce(topic, v, k, 0)
    p.commit_transaction(30)


def test_a_checkpoint_past_the_last_stable_offset_keeps_its_state_one_past_the_end_is_wiped(
        kafka: str, tmp_path: Path) -> None:
    name = unique_name("restore")
    topic = f"{name}.changelog"
    create_topic(kafka, topic, 1)
    ours = _txn_producer(kafka, f"{name}-ours")
    zombie = _txn_producer(kafka, f"{name}-zombie")
    restorer = Restorer({"bootstrap.servers": kafka}, topic, 24 * 3600 * 1000)
    try:
        _committed(ours, topic, [(b"a", b"1")])       # offset 0, marker 1
        zombie.begin_transaction()
        zombie.produce(topic, b"z", b"zz", 0)         # offset 2: open, holds the last stable offset
        zombie.flush(30)
        _committed(ours, topic, [(b"b", b"2")])       # offset 3, marker 4
        _, lso = restorer.consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
        assert lso == 2, lso

        # Our state is at the end of our last commit (as after_commit leaves it).
        store = PartitionStore(tmp_path / "kept", name, 1, 0)
        store.open()
        store.apply_restored([(b"a", b"1"), (b"b", b"2")], 5)
        restorer.restore({0: store}, timeout=30)
        assert store.get(b"b") == b"2", "the last commit's state was wiped"
        assert store.checkpoint()["changelog_offset"] == 5  # type: ignore[index]
        store.close()

        # Past the high watermark: the changelog was recreated; wiped, then restored to its end.
        store = PartitionStore(tmp_path / "recreated", name, 1, 0)
        store.open()
        store.apply_restored([(b"stale", b"x")], 100)
        restorer.restore({0: store}, timeout=30)
        assert store.get(b"stale") is None and store.get(b"a") == b"1"
        assert store.get(b"b") is None  # (behind the open transaction: not stable yet)
        store.close()
    finally:
        zombie.abort_transaction(30)
        restorer.close()
        ours.flush(10)
