"""The Kafka guarantees oncely's one rule stands on, proven against a real broker.

Each test asserts both sides of its property (what must be visible and what
must not), so it fails when the property is broken: reading read_uncommitted
where read_committed is required, committing where the code aborts, a
transactional.id that does not fence, offsets that are not sent in the
transaction.
"""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from oncely.testing import produce, read_to_end

TXN_TIMEOUT = 10.0


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _txn_producer(bootstrap: str, transactional_id: str) -> Producer:
    p = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": transactional_id,
        "transaction.timeout.ms": 10000,
        "linger.ms": 5,
    })
    p.init_transactions(TXN_TIMEOUT)
    return p


def _values(records) -> list[bytes]:
    return [r.value for r in records]


def _consumer(bootstrap: str, group_id: str, isolation: str, **extra) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": isolation,
        **extra,
    })


def _is_fenced(err: KafkaError) -> bool:
    return err.code() == KafkaError._FENCED or err.fatal()


# -- committed vs aborted -----------------------------------------------------


def test_aborted_transaction_is_invisible_to_read_committed_only(kafka, kafka_topic):
    topic = kafka_topic()
    p = _txn_producer(kafka, _uid("txn-abort"))

    p.begin_transaction()
    for i in range(3):
        p.produce(topic, key=b"k", value=f"committed-{i}".encode())
    p.commit_transaction(TXN_TIMEOUT)

    p.begin_transaction()
    for i in range(3):
        p.produce(topic, key=b"k", value=f"aborted-{i}".encode())
    # abort_transaction purges what is not yet sent: flush so the aborted
    # records really are in the log and only the abort marker hides them.
    assert p.flush(TXN_TIMEOUT) == 0
    p.abort_transaction(TXN_TIMEOUT)

    p.begin_transaction()
    p.produce(topic, key=b"k", value=b"committed-3")
    p.commit_transaction(TXN_TIMEOUT)

    committed = [f"committed-{i}".encode() for i in range(4)]
    aborted = [f"aborted-{i}".encode() for i in range(3)]

    seen_committed = _values(read_to_end(kafka, topic, isolation="read_committed"))
    assert seen_committed == committed
    assert not set(aborted) & set(seen_committed)

    # The aborted records are in the log: a read_uncommitted reader sees them,
    # in log order between the committed ones.
    seen_uncommitted = _values(read_to_end(kafka, topic, isolation="read_uncommitted"))
    assert seen_uncommitted == committed[:3] + aborted + committed[3:]


# -- last stable offset -------------------------------------------------------


def _drain(consumer: Consumer, quiet: float) -> tuple[list[tuple[int, bytes]], list[int]]:
    """Consume until nothing arrives for `quiet` seconds after an EOF.
    Returns (offset, value) pairs and the offsets where EOF was reported."""
    got: list[tuple[int, bytes]] = []
    eofs: list[int] = []
    deadline = time.monotonic() + 15
    last_news = time.monotonic()
    while time.monotonic() < deadline:
        msgs = consumer.consume(100, timeout=0.2)
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    eofs.append(m.offset())
                    continue
                raise KafkaException(err)
            got.append((m.offset(), m.value()))
        if msgs:
            last_news = time.monotonic()
        elif eofs and time.monotonic() - last_news >= quiet:
            break
    return got, eofs


def test_read_committed_consumer_stops_at_open_transaction(kafka, kafka_topic):
    topic = kafka_topic()
    tp = TopicPartition(topic, 0)
    produce(kafka, topic, [f"before-{i}" for i in range(3)])  # offsets 0..2, non-transactional

    p = _txn_producer(kafka, _uid("txn-lso"))
    p.begin_transaction()
    for i in range(4):
        p.produce(topic, value=f"open-{i}".encode())  # offsets 3..6, transaction left open
    assert p.flush(TXN_TIMEOUT) == 0

    rc = _consumer(kafka, _uid("lso-rc"), "read_committed", **{"enable.partition.eof": True})
    ru = _consumer(kafka, _uid("lso-ru"), "read_uncommitted")
    try:
        # The end offset a read_committed consumer is told is the last stable
        # offset (first offset of the open transaction), below the high watermark.
        _, lso = rc.get_watermark_offsets(tp, timeout=10)
        _, high = ru.get_watermark_offsets(tp, timeout=10)
        assert lso == 3
        assert high == 7
        assert lso < high

        rc.assign([TopicPartition(topic, 0, 0)])
        got, eofs = _drain(rc, quiet=1.5)
        assert [v for _, v in got] == [b"before-0", b"before-1", b"before-2"]
        assert all(off < lso for off, _ in got)
        assert eofs and eofs[0] == lso  # its end of partition is the LSO

        p.commit_transaction(TXN_TIMEOUT)

        more, _ = _drain(rc, quiet=0.5)
        assert [v for _, v in more] == [f"open-{i}".encode() for i in range(4)]
        assert [off for off, _ in more] == [3, 4, 5, 6]
        _, lso_after = rc.get_watermark_offsets(tp, timeout=10)
        assert lso_after == 8  # 7 records + the commit marker
    finally:
        rc.close()
        ru.close()


# -- fencing --------------------------------------------------------------------


def test_same_transactional_id_fences_the_older_producer(kafka, kafka_topic):
    topic = kafka_topic()
    txn_id = _uid("txn-fence")

    old = _txn_producer(kafka, txn_id)
    old.begin_transaction()
    old.produce(topic, value=b"old-0")
    assert old.flush(TXN_TIMEOUT) == 0

    new = _txn_producer(kafka, txn_id)  # bumps the epoch: aborts old's open transaction

    with pytest.raises(KafkaException) as first:
        old.produce(topic, value=b"old-1")
        old.flush(TXN_TIMEOUT)
    assert _is_fenced(first.value.args[0]), first.value.args[0]

    with pytest.raises(KafkaException) as commit:
        old.commit_transaction(TXN_TIMEOUT)
    assert _is_fenced(commit.value.args[0]), commit.value.args[0]

    new.begin_transaction()
    new.produce(topic, value=b"new-0")
    new.produce(topic, value=b"new-1")
    new.commit_transaction(TXN_TIMEOUT)

    assert _values(read_to_end(kafka, topic, isolation="read_committed")) == [b"new-0", b"new-1"]
    # old-0 did reach the log; it is the fencing abort that hides it.
    uncommitted = _values(read_to_end(kafka, topic, isolation="read_uncommitted"))
    assert b"old-0" in uncommitted
    assert b"old-1" not in uncommitted
    assert [v for v in uncommitted if v.startswith(b"new-")] == [b"new-0", b"new-1"]


# -- offsets in the transaction ----------------------------------------------


def _committed_offset(bootstrap: str, group_id: str, tp: TopicPartition) -> int:
    """The group's committed offset, asked by a fresh consumer of that group."""
    c = _consumer(bootstrap, group_id, "read_committed")
    try:
        [res] = c.committed([TopicPartition(tp.topic, tp.partition)], timeout=10)
        assert res.error is None, res.error
        return res.offset
    finally:
        c.close()


def _consume_n(consumer: Consumer, n: int, timeout: float = 15.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        for m in consumer.consume(n - len(out), timeout=0.5):
            if m.error() is not None:
                raise KafkaException(m.error())
            out.append(m)
    assert len(out) == n, f"consumed {len(out)} of {n}"
    return out


def test_offsets_commit_atomically_with_the_output(kafka, kafka_topic):
    source = kafka_topic(prefix="offsets-src")
    output = kafka_topic(prefix="offsets-out")
    src_tp = TopicPartition(source, 0)
    group = _uid("offsets-group")
    produce(kafka, source, [f"in-{i}" for i in range(5)])

    consumer = _consumer(kafka, group, "read_committed")
    consumer.subscribe([source])
    p = _txn_producer(kafka, _uid("txn-offsets"))

    def transaction(msgs, tag: str, commit: bool) -> None:
        p.begin_transaction()
        for m in msgs:
            p.produce(output, key=m.value(), value=f"{tag}:{m.value().decode()}".encode())
        next_offset = msgs[-1].offset() + 1  # offsets sent are "next to read"
        p.send_offsets_to_transaction(
            [TopicPartition(source, 0, next_offset)], consumer.consumer_group_metadata(), TXN_TIMEOUT
        )
        if commit:
            p.commit_transaction(TXN_TIMEOUT)
        else:
            assert p.flush(TXN_TIMEOUT) == 0  # so the aborted output really is in the log
            p.abort_transaction(TXN_TIMEOUT)

    try:
        first = _consume_n(consumer, 2)
        transaction(first, "t1", commit=True)
        assert _committed_offset(kafka, group, src_tp) == 2

        rest = _consume_n(consumer, 3)
        assert [m.offset() for m in rest] == [2, 3, 4]

        transaction(rest, "aborted", commit=False)
        assert _committed_offset(kafka, group, src_tp) == 2  # unchanged
        assert _values(read_to_end(kafka, output)) == [b"t1:in-0", b"t1:in-1"]
        assert b"aborted:in-2" in _values(read_to_end(kafka, output, isolation="read_uncommitted"))

        transaction(rest, "t2", commit=True)
        assert _committed_offset(kafka, group, src_tp) == 5  # advanced to next to read
        assert _values(read_to_end(kafka, output)) == [
            b"t1:in-0", b"t1:in-1", b"t2:in-2", b"t2:in-3", b"t2:in-4",
        ]
    finally:
        consumer.close()

    # A new member of the group resumes exactly at the first unprocessed record.
    produce(kafka, source, ["in-5"])
    resumed = _consumer(kafka, group, "read_committed")
    try:
        resumed.subscribe([source])
        [m] = _consume_n(resumed, 1)
        assert (m.offset(), m.value()) == (5, b"in-5")
    finally:
        resumed.close()
