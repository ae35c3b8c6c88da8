"""Small Kafka helpers the CLI, the demo, the admin read-back and tests share:
create a topic, produce records, read a topic to its end (read_committed).

`config` arguments are extra librdkafka settings (SASL, SSL, ...), the same
as an app's `kafka={...}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from oncely.logs import kafka_conf_logging


# Metadata races of a topic created a moment ago (no leader elected yet, or
# not yet known to the broker answering). librdkafka raises them from
# get_watermark_offsets without setting the retriable flag.
_TRANSIENT = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION, KafkaError._TIMED_OUT,
              KafkaError._TRANSPORT}


def watermarks(consumer: Consumer, tp: TopicPartition, timeout: float = 60.0) -> tuple[int, int]:
    """(low, high) offsets (high is the LSO for a read_committed consumer),
    retrying transient errors until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=min(10.0, timeout))
        except KafkaException as e:
            err = e.args[0]
            if not (err.retriable() or err.code() in _TRANSIENT) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
    """Create a topic and wait until its metadata is visible."""
    admin = AdminClient({**kafka_conf_logging(), "bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1, config=config or {})])[name].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5)
        t = md.topics.get(name)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return name
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} did not appear")


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int = 0
    offset: int = 0
    topic: str = ""
    timestamp: int = 0  # ms since the epoch

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def _bytes(x: Any) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    return orjson.dumps(x)


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Any],
    partition: int | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """Produce records (idempotently) and wait for all acknowledgements.

    Each record is a value, or a (key, value) or (key, value, headers) tuple;
    str is UTF-8 encoded, bytes kept, anything else JSON-encoded.
    Returns the number of records produced.
    """
    producer = Producer({**kafka_conf_logging(), **(config or {}), "bootstrap.servers": bootstrap,
                         "enable.idempotence": True, "linger.ms": 5})
    errors: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            errors.append(str(err))

    n = 0
    for rec in records:
        key, headers = None, None
        if isinstance(rec, tuple):
            key, value, *rest = rec
            headers = rest[0] if rest else None
        else:
            value = rec
        kwargs: dict[str, Any] = {"key": _bytes(key), "value": _bytes(value), "on_delivery": on_delivery}
        if headers:
            kwargs["headers"] = [(k, _bytes(v)) for k, v in (headers.items() if isinstance(headers, dict) else headers)]
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        n += 1
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"produce to {topic} failed: {remaining} undelivered, errors: {errors[:5]}")
    return n


def read_to_end(
    bootstrap: str,
    topic: str,
    isolation: Literal["read_committed", "read_uncommitted"] = "read_committed",
    timeout: float = 60.0,
    config: dict[str, Any] | None = None,
) -> list[Record]:
    """Read every partition of `topic` from the beginning to its current end.

    Under read_committed the end is the last stable offset, so records of open
    transactions are not waited for and aborted ones are never returned.
    """
    return list(iter_records(bootstrap, topic, isolation=isolation, timeout=timeout, config=config))


def iter_records(
    bootstrap: str,
    topic: str,
    start: Callable[[int, int], int] | None = None,
    follow: Callable[[], bool] | None = None,
    isolation: Literal["read_committed", "read_uncommitted"] = "read_committed",
    timeout: float = 60.0,
    config: dict[str, Any] | None = None,
) -> Iterator[Record]:
    """The records of every partition of `topic`, from `start(low, high)` of
    each (default: low, the beginning) to the end it has when reached. With
    `follow`, keep reading new records for as long as it returns True.
    Raises ValueError when the topic does not exist."""
    consumer = Consumer({
        **kafka_conf_logging(),
        **(config or {}),
        "bootstrap.servers": bootstrap,
        "group.id": unique_name("oncely-read"),
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
        # The end is seen only after an empty fetch, which the broker holds
        # this long; keep it short so reading a quiet topic is quick.
        "fetch.wait.max.ms": 10,
    })
    try:
        # A topic created a moment ago may not be in every broker's metadata
        # yet: look again for a few seconds before calling it missing.
        deadline = time.monotonic() + 3
        while True:
            tmeta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if tmeta is not None and tmeta.error is None:
                break
            if time.monotonic() >= deadline:
                raise ValueError(f"topic {topic} does not exist")
            time.sleep(0.1)
        pending = set()
        assignment = []
        for p in sorted(tmeta.partitions):
            lo, hi = watermarks(consumer, TopicPartition(topic, p))
            first = max(lo, start(lo, hi)) if start else lo
            if hi > first or follow:
                pending.add(p)
                assignment.append(TopicPartition(topic, p, first))
        if not pending:
            return
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout
        while follow() if follow else pending:
            if not follow and time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: partitions {sorted(pending)} did not reach their end")
            for m in consumer.consume(1000, timeout=0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                        continue
                    raise RuntimeError(f"reading {topic}: {err}")
                yield Record(m.key(), m.value(), list(m.headers() or []), m.partition(), m.offset(), topic,
                             m.timestamp()[1])
    finally:
        consumer.close()
