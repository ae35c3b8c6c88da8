"""The floor: a confluent-kafka transactional consume -> produce copy.

No processing and no state: read_committed input, one transaction per commit
interval with send_offsets_to_transaction. Anything exactly-once on Kafka
pays at least this. Used in-process by bench_processor.py and, run as a
script, as the "raw" system of bench_peers.py (copies until SIGTERM):

    python bench/rawcopy.py --bootstrap HOST:PORT --source T --out T --group G
"""

from __future__ import annotations

import signal
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from peer_args import peer_args


def transactional_copy(bootstrap: str, src: str, dst: str, group: str, records: int | None = None,
                       stop: threading.Event | None = None, commit_interval: float = 0.1) -> float:
    """Copy `src` to `dst` (same partition) until `records` records are
    copied or `stop` is set; returns seconds from the first record read to
    the last commit."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_committed",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": group, "linger.ms": 5,
                         "transaction.timeout.ms": 10000})
    producer.init_transactions()
    consumer.subscribe([src])
    producer.begin_transaction()
    copied = 0
    offsets: dict[int, int] = {}
    t0: float | None = None
    last = time.monotonic()
    while (records is None or copied < records) and not (stop and stop.is_set()):
        for m in consumer.consume(500, 0.05):
            if m.error():
                continue
            if t0 is None:
                t0 = time.monotonic()
            while True:
                try:
                    producer.produce(dst, key=m.key(), value=m.value(), partition=m.partition())
                    break
                except BufferError:
                    producer.poll(0.01)
            offsets[m.partition()] = m.offset() + 1
            copied += 1
        if time.monotonic() - last >= commit_interval or copied == records:
            if offsets:
                producer.send_offsets_to_transaction([TopicPartition(src, q, o) for q, o in offsets.items()],
                                                     consumer.consumer_group_metadata())
                producer.commit_transaction()
                producer.begin_transaction()
                offsets.clear()
            last = time.monotonic()
    elapsed = time.monotonic() - (t0 or time.monotonic())
    producer.abort_transaction()
    consumer.close()
    return elapsed


def main() -> None:
    args = peer_args(__doc__, state_dir=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    transactional_copy(args.bootstrap, args.source, args.out, args.group, stop=stop,
                       commit_interval=args.commit_interval)


if __name__ == "__main__":
    main()
