"""The processor's Kafka clients and the settings oncely owns in them.

Every client gets the user's settings plus librdkafka logging routed to
Python logging; the settings in RESERVED carry the guarantees and refuse an
override. Blocking calls on these clients run on a `Worker` (worker.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from oncely.logs import kafka_conf_logging
from oncely.processor.identity import group_instance_id
from oncely.processor.rebalance import drop, referenced_elsewhere
from oncely.processor.worker import Stuck, Worker

if TYPE_CHECKING:
    from oncely.app import App, AppConfig
    from oncely.processor.commit_loop import CommitLoop

log = logging.getLogger("oncely.commit")

# Consumer/producer settings oncely owns; a user override would break the guarantees.
RESERVED = {
    "group.id", "isolation.level", "enable.auto.commit", "enable.auto.offset.store", "transactional.id",
    "enable.idempotence", "partition.assignment.strategy", "transaction.timeout.ms", "acks",
    "group.instance.id",
    # The producer's delivery bound is the transaction's (`transaction_timeout_ms`),
    # and keyed records land where Kafka's Java clients put them.
    "message.timeout.ms", "delivery.timeout.ms", "partitioner",
}


# A commit that follows the previous one closely finds it still completing
# (its markers being written): AddOffsetsToTxn is answered
# CONCURRENT_TRANSACTIONS and retried after retry.backoff.ms, doubled per
# retry up to the max. librdkafka's 100 ms / 1 s added 100-300 ms to such
# commits on a quiet broker and up to seconds on a busy one; the conflict
# usually clears within a few ms, and 1 ms beat 3 and 10 ms
# (bench/txn_probe.py, bench/peer_breakdown.py). Timing only.
BACKOFF = {"retry.backoff.ms": 1, "retry.backoff.max.ms": 100}


def source_start(config: "AppConfig") -> int:
    """Where source partitions without a committed offset start (the log
    itself always starts at the beginning); oncely/preflight.py has checked
    the setting."""
    reset = str(config.kafka.get("auto.offset.reset", "earliest")).lower()
    return OFFSET_END if reset in ("latest", "largest", "end") else OFFSET_BEGINNING


class KafkaClients:
    def __init__(self, app: "App", config: "AppConfig", root: Path) -> None:
        self.app = app
        self.cfg = config
        self.root = root

    def base(self) -> dict[str, Any]:
        # librdkafka's lines through Python logging, repeats collapsed.
        conf = {**kafka_conf_logging(), "bootstrap.servers": self.cfg.bootstrap, **self.cfg.kafka}
        conf.pop("auto.offset.reset", None)  # applied per source partition in the assignment
        return conf

    def producer_conf(self, transactional_id: str) -> dict[str, Any]:
        base = self.base()
        if not BACKOFF.keys() & base.keys():  # a user's setting of either wins
            base = {**BACKOFF, **base}
        return {
            # Defaults a user's settings override (ONCELY_KAFKA_COMPRESSION_TYPE=zstd, ...).
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            **base,
            # What exactly-once and the processor's bounds rest on: not overridable.
            "transactional.id": transactional_id,
            "enable.idempotence": True,
            "transaction.timeout.ms": self.cfg.transaction_timeout_ms,
            "message.timeout.ms": self.cfg.transaction_timeout_ms,
            # Keyed records land where Kafka's Java clients would put them.
            "partitioner": "murmur2_random",
        }

    def consumer(self) -> Consumer:
        cfg = self.cfg
        conf = {
            **self.base(),
            "group.id": self.app.name,
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": cfg.session_timeout_ms,
            "heartbeat.interval.ms": max(500, cfg.session_timeout_ms // 5),
            "max.poll.interval.ms": cfg.max_poll_interval_ms,
            "fetch.wait.max.ms": 100,
        }
        if cfg.static_membership:
            conf["group.instance.id"] = group_instance_id(self.root, self.app.name)
        return Consumer(conf)

    def fetch_committed(self, tps: list[TopicPartition], stable: bool = True) -> list[TopicPartition]:
        """The group's committed offsets (read_committed: waits while a
        transaction holding offsets for them is open). A fresh consumer each
        time, on a worker: after a broker restart a long-lived client can
        keep a stale group coordinator, and its fetches then time out for
        good (seen with the main consumer after a static member was fenced)."""
        conf = {**self.base(), "group.id": self.app.name, "enable.auto.commit": False,
                "isolation.level": "read_committed" if stable else "read_uncommitted"}
        c = Consumer(conf)
        try:
            return c.committed(tps, timeout=self.cfg.txn_call_timeout)
        finally:
            c.close()

    def admin(self) -> AdminClient:
        return AdminClient(self.base())

    def topic_exists(self, topic: str) -> bool:
        md = self.admin().list_topics(topic, timeout=10)
        t = md.topics.get(topic)
        return t is not None and t.error is None


def close_clients(loop: CommitLoop) -> None:
    """Close every client of a stopping loop, each close bounded (a close
    during a broker outage must not hang the exit). The consumer goes as
    rebalance.py says: a static member that has joined is dropped without a
    close, any other member (or one something still refers to) leaves the
    group first."""
    closer = Worker("close", loop.interrupt)
    member, loop.member = loop.member, None
    held = [loop.consumer] if loop.consumer is not None else []
    loop.consumer = None
    # A static member that has joined is dropped when nothing but the
    # assignment (about to let go) holds its consumer.
    dropping = bool(held) and loop.cfg.static_membership and member is not None and member.assigned and \
        loop.assignment is not None and not referenced_elsewhere(held, known=1)
    if held and member is not None:
        try:
            if dropping:
                member.settle(held[0], closer, loop.bound)
            else:
                member.leave(held[0], closer, loop.bound)
        except Exception as e:  # Stuck included: what follows is bounded too
            log.warning("letting go of the group: %s", e)
    if loop.assignment is not None:
        loop.assignment.close()  # (lets go of the consumer too)
    if held:
        try:
            if not (dropping and drop(held, closer, loop.bound)):
                if dropping:
                    log.warning("the consumer could not be dropped (still referenced): closing it")
                closer.call(held[0].close, loop.bound, "closing the consumer")
        except Stuck as e:
            log.warning("%s", e)
            if loop.txn is not None:
                loop.txn.stats.abandoned += 1
        except Exception as e:  # leaving the group is best effort
            log.warning("closing the consumer: %s", e)
        held.clear()
    if loop.txn is not None:
        loop.txn.close()
    if loop.restorer is not None:
        restorer = loop.restorer
        loop.restorer = None
        try:
            closer.call(restorer.close, loop.bound, "closing the restore consumer")
        except Exception as e:
            log.warning("closing the restore consumer: %s", e)
    closer.close()
    if loop.lock is not None:
        loop.lock.release()
        loop.lock = None
