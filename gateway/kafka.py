"""The gateway's Kafka side: an idempotent producer for requests and a
reader of one `<app>.replies` partition for their answers.

The gateway holds no state: every request names its reply (`request_id`,
this gateway's replies partition), and the partition that applies it
answers there in its own transaction. Each gateway reads one replies
partition (chosen at random, or given) from its end, read_committed, and
hands an answer to the request waiting under its key; answers for other
gateways on the same partition are skipped by a dict lookup. Reading every
partition instead would make each gateway read every answer: with N
gateways that is N times the reads for nothing.

librdkafka's calls block, so they run on two threads (producer poll,
replies consume) that hand results to the event loop with
`call_soon_threadsafe`; the loop never blocks on Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from oncely import schemas
from oncely.errors import ConfigError
from oncely.kafka_io import watermarks
from oncely.logs import kafka_conf_logging
from oncely.shuffle.routing import partition_for

log = logging.getLogger("oncely.gateway")
DELIVERY_TIMEOUT_MS = 15_000  # a request Kafka has not taken by then is a 503


class KafkaUnavailable(Exception):
    """The broker did not take a request (down, or the producer's queue is full)."""


class NotAckedYet(KafkaUnavailable):
    """No acknowledgement within the time given, and no error either: the
    record may still be delivered (the producer retries it)."""


class GatewayKafka:
    def __init__(self, bootstrap: str, app: str, partitions: int, kafka: dict[str, str] | None = None,
                 replies_partition: int | None = None) -> None:
        self.app = app
        self.partitions = partitions
        self.log_topic = f"{app}.log"
        self.replies_topic = f"{app}.replies"
        self.replies_partition = (random.randrange(partitions) if replies_partition is None
                                  else replies_partition)
        base = {**kafka_conf_logging(), "bootstrap.servers": bootstrap, **(kafka or {})}
        self._base = base
        self.producer = Producer({**base, "enable.idempotence": True, "linger.ms": 1,
                                  "delivery.timeout.ms": DELIVERY_TIMEOUT_MS, "error_cb": self._on_error})
        # Why no broker is reachable (librdkafka said all brokers are down
        # and a metadata probe failed), None while one is: requests are
        # refused at once meanwhile (503) instead of queueing until their
        # wait ends.
        self.down: str | None = None
        self._suspect: str | None = None  # librdkafka said so; not probed yet
        self.consumer = Consumer({**base, "group.id": f"{app}.gateway", "enable.auto.commit": False,
                                  "isolation.level": "read_committed", "enable.partition.eof": False,
                                  "fetch.wait.max.ms": 10})
        self.waiting: dict[bytes, asyncio.Future] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- life -------------------------------------------------------------------

    async def start(self) -> "GatewayKafka":
        """Position the replies reader at the end of its partition (before
        any request goes out) and start both threads."""
        self.loop = asyncio.get_running_loop()
        tp = TopicPartition(self.replies_topic, self.replies_partition)
        try:
            _, high = await asyncio.to_thread(watermarks, self.consumer, tp, 30.0)
        except KafkaException as e:
            raise ConfigError(f"cannot read {self.replies_topic}: {e} (start the app once with oncely run "
                              "to create its topics)") from None
        self.consumer.assign([TopicPartition(self.replies_topic, self.replies_partition, high)])
        await asyncio.to_thread(self.producer.list_topics, self.log_topic, 10)  # connected before the first request
        for target, name in ((self._poll, "gateway-producer"), (self._read, "gateway-replies")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("gateway of %r: replies on %s[%d] from offset %d", self.app, self.replies_topic,
                 self.replies_partition, high)
        return self

    async def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            await asyncio.to_thread(t.join, 5)
        await asyncio.to_thread(self.producer.flush, 5)
        await asyncio.to_thread(self.consumer.close)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)
            if self.down is not None or self._suspect is not None:
                self._probe()

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._suspect = err.str()

    def _probe(self) -> None:
        """One bounded metadata request: no answer confirms an outage (an
        idle connection closed by the broker also reads as all brokers
        down), an answer ends it."""
        suspect, self._suspect = self._suspect, None
        try:
            self.producer.list_topics(self.log_topic, 1.0)
        except KafkaException:
            if self.down is None:
                log.warning("gateway: Kafka unreachable (%s); refusing requests with 503 until it answers",
                            suspect)
                self.down = suspect or "no answer"
            return
        if self.down is not None:
            log.warning("gateway: Kafka answers again")
        self.down = None

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                # poll returns at the first answer (consume would wait out its
                # timeout for a full batch); then drain what is buffered.
                first = self.consumer.poll(0.05)
                if first is None:
                    continue
                msgs = [first, *self.consumer.consume(500, 0)]
            except KafkaException as e:  # pragma: no cover - logged, the reader keeps going
                log.warning("replies reader: %s", e)
                continue
            batch = [(m.key(), m.value()) for m in msgs if m.error() is None and m.key() is not None]
            if batch and self.loop is not None:
                self.loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, batch: list[tuple[bytes, bytes]]) -> None:
        waiting = self.waiting
        for key, value in batch:
            fut = waiting.pop(key, None)
            if fut is None or fut.done():
                continue
            try:
                fut.set_result(decode_reply(value))
            except (schemas.SchemaError, ValueError) as e:
                fut.set_exception(e)

    # -- requests -----------------------------------------------------------------

    def request_id(self, mined: bool = False) -> bytes:
        """A fresh request id; `mined`: one that hashes to this gateway's
        replies partition (awakeable answers go where their id hashes)."""
        while True:
            r = os.urandom(16)
            if not mined or partition_for(r, self.partitions) == self.replies_partition:
                return r

    def reply_to(self, request_id: bytes) -> dict[str, Any]:
        return {"request_id": request_id, "partition": self.replies_partition}

    def expect(self, request_id: bytes) -> asyncio.Future:
        """A future for the answer to `request_id`: register before producing."""
        assert self.loop is not None
        fut = self.loop.create_future()
        self.waiting[request_id] = fut
        return fut

    def forget(self, request_id: bytes) -> None:
        self.waiting.pop(request_id, None)

    async def produce(self, partition: int, key: bytes, value: bytes, timeout: float) -> None:
        """Produce to the log and wait until Kafka acknowledged it, at most
        `timeout` seconds; KafkaUnavailable otherwise."""
        assert self.loop is not None
        if self.down is not None:
            raise KafkaUnavailable(f"no broker reachable ({self.down})")
        loop = self.loop
        acked = loop.create_future()

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is None:
                self.down = None
            loop.call_soon_threadsafe(_settle, acked, err)

        try:
            self.producer.produce(self.log_topic, key=key, value=value, partition=partition,
                                  on_delivery=on_delivery)
        except BufferError:
            raise KafkaUnavailable("the gateway's producer queue is full") from None
        except KafkaException as e:
            raise KafkaUnavailable(str(e)) from None
        try:
            err = await asyncio.wait_for(acked, timeout)
        except asyncio.TimeoutError:
            raise NotAckedYet(f"Kafka did not acknowledge the request within {timeout:g} s") from None
        if err is not None:
            raise KafkaUnavailable(str(err))

    async def healthy(self, timeout: float = 3.0) -> str | None:
        """None when the broker answers metadata for the log topic, else why not."""
        try:
            md = await asyncio.wait_for(asyncio.to_thread(self.producer.list_topics, self.log_topic, timeout),
                                        timeout + 1)
        except (asyncio.TimeoutError, KafkaException) as e:
            return f"Kafka unreachable: {e or 'timed out'}"
        t = md.topics.get(self.log_topic)
        if t is None or t.error is not None:
            return f"topic {self.log_topic} is not available"
        return None


def _settle(fut: asyncio.Future, err: Any) -> None:
    if not fut.done():
        fut.set_result(err)


def decode_reply(value: bytes) -> dict[str, Any]:
    """A Reply record, or an awakeable answer (JSON `{ok, error}`)."""
    if value[:1] == b"{":
        return orjson.loads(value)
    return schemas.decode("reply", value)
