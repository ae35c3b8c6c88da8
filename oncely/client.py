"""`Client`: invoke handlers from outside an app by producing to its log."""

from __future__ import annotations

import os
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from oncely.app import App, Handler
from oncely import schemas
from oncely.sdk.protocol import decode_value, encode_value
from oncely.errors import AwakeableError, ConfigError, TerminalError
from oncely.logs import kafka_conf_logging
from oncely.observe.tracing import current_traceparent
from oncely.shuffle.delivery import awakeable_result
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import format_id, idempotent_id, parse_awakeable, random_id
from oncely.shuffle.routing import partition_for
from oncely.shuffle.targets import resolve


class Client:
    """Produces Invoke records to `<app>.log` (idempotent producer).

    `send` queues the record and returns the invocation id at once; `flush()`
    (or leaving a `with` block) waits until every record is acknowledged and
    raises if any was not.
    """

    def __init__(self, bootstrap: str | None = None, app: str | App | None = None,
                 kafka: dict[str, str] | None = None) -> None:
        self.bootstrap = bootstrap or os.environ.get("ONCELY_KAFKA_BOOTSTRAP")
        if not self.bootstrap:
            raise ConfigError("Client needs a bootstrap address (argument or ONCELY_KAFKA_BOOTSTRAP)")
        self.app_name = app.name if isinstance(app, App) else app
        base = {**kafka_conf_logging(), "bootstrap.servers": self.bootstrap}
        self._producer = Producer({**base, "enable.idempotence": True, "linger.ms": 5, **(kafka or {})})
        self._admin_conf = {**base, **(kafka or {})}
        self._partitions: dict[str, int] = {}
        self._errors: list[str] = []
        self._consumer: Consumer | None = None

    def _partition_count(self, app: str) -> int:
        n = self._partitions.get(app)
        if n is None:
            md = AdminClient(self._admin_conf).list_topics(f"{app}.log", timeout=10)
            t = md.topics.get(f"{app}.log")
            if t is None or t.error is not None or not t.partitions:
                raise ConfigError(f"topic {app}.log does not exist: start the app once (oncely run) to create it")
            n = self._partitions[app] = len(t.partitions)
        return n

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def send(self, target: Handler | str, *args: Any, idempotency_key: str | None = None,
             idempotency_retention: float | None = None) -> str:
        """Invoke a handler once; returns the invocation id.

        `send(handler, key, payload)` for keyed services, `send(handler,
        payload)` for stateless ones, or by name: `send("counter", "alice",
        "add", payload)` (key None for stateless services). With an
        idempotency key, a repeated send within the retention (default 24 h)
        is recognised and dropped by the processor.
        """
        if isinstance(target, Handler):
            app = target.service.app.name
        else:
            app = self.app_name
            if app is None:
                raise ConfigError("Client(app=...) is needed to send by service name")
        t = resolve(target, args)
        service, handler, kb = t.service, t.handler, t.key
        inv_id = idempotent_id(service, handler, kb, idempotency_key) if idempotency_key else random_id()
        record = invoke_record(
            inv_id, service, handler, kb, t.payload, t.payload_format, idempotency_key=idempotency_key,
            idempotency_retention_ms=int(idempotency_retention * 1000) if idempotency_retention else None,
            traceparent=current_traceparent(),
        )
        routing = kb if kb is not None else inv_id
        partition = partition_for(routing, self._partition_count(app))
        while True:
            try:
                self._producer.produce(f"{app}.log", key=routing, value=record, partition=partition,
                                       on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        return format_id(inv_id)

    def call(self, target: Handler | str, *args: Any, idempotency_key: str | None = None,
             timeout: float = 30.0) -> Any:
        """Invoke a handler and wait for its result (a JSON value, or bytes),
        on the gateway's path: the Invoke names a reply on `<app>.replies`,
        answered by the transaction that finishes the invocation.

        Arguments as for `send`. Without an idempotency key one is assigned
        (kept 1 h); with one, a repeated call (also from another process,
        or over HTTP) attaches to the same invocation and gets its result.
        Raises TerminalError when the invocation failed, TimeoutError when
        no result came within `timeout` (it may still finish: call again
        with the same idempotency key to get its result)."""
        if isinstance(target, Handler):
            app = target.service.app.name
        else:
            app = self.app_name
            if app is None:
                raise ConfigError("Client(app=...) is needed to call by service name")
        t = resolve(target, args)
        idem = idempotency_key or f"client-{os.urandom(12).hex()}"
        inv_id = idempotent_id(t.service, t.handler, t.key, idem)
        n = self._partition_count(app)
        request = random_id()
        reply_tp = TopicPartition(f"{app}.replies", partition_for(request, n))
        start = self._reply_start(reply_tp)
        record = invoke_record(inv_id, t.service, t.handler, t.key, t.payload, t.payload_format,
                               idempotency_key=idem, idempotency_retention_ms=None if idempotency_key else 3_600_000,
                               reply={"request_id": request, "partition": reply_tp.partition})
        routing = t.key if t.key is not None else inv_id
        self._producer.produce(f"{app}.log", key=routing, value=record, partition=partition_for(routing, n),
                               on_delivery=self._on_delivery)
        self.flush()
        answer = schemas.decode("reply", self._await_reply(reply_tp, start, request, timeout))
        if answer["status"] == "completed":
            return decode_value(answer["value"]) if answer["value"] is not None else None
        raise TerminalError(answer["error"] or f"invocation {format_id(inv_id)} failed")

    def resolve_awakeable(self, awakeable_id: str, value: Any = None, *, wait: bool = True,
                          timeout: float = 30.0) -> None:
        """Complete an awakeable with `value` (JSON or bytes). With `wait`,
        block until the app answers: AwakeableError when the awakeable was
        already completed or its invocation is not in flight, TimeoutError
        when no processor answered in `timeout` seconds (the resolution stays
        on the log and is applied when one runs)."""
        self._complete_awakeable(awakeable_id, encode_value(value), None, wait, timeout)

    def reject_awakeable(self, awakeable_id: str, reason: str, *, wait: bool = True,
                         timeout: float = 30.0) -> None:
        """Fail an awakeable: the waiting handler gets TerminalError(reason)."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("reject_awakeable: the reason must be a non-empty str")
        self._complete_awakeable(awakeable_id, None, reason, wait, timeout)

    def _complete_awakeable(self, awakeable_id: str, value: bytes | None, failure: str | None, wait: bool,
                            timeout: float) -> None:
        try:
            app, partition, inv_id, index = parse_awakeable(awakeable_id)
        except ValueError as e:
            raise AwakeableError(str(e)) from None
        n = self._partition_count(app)
        if partition >= n:
            raise AwakeableError(f"awakeable {awakeable_id}: app {app!r} has no log partition {partition}")
        request = random_id()
        record = awakeable_result(inv_id, index, value, failure, request if wait else None)
        reply_tp = TopicPartition(f"{app}.replies", partition_for(request, n))
        start = self._reply_start(reply_tp) if wait else None
        self._producer.produce(f"{app}.log", key=inv_id, value=record, partition=partition,
                               on_delivery=self._on_delivery)
        self.flush()
        if start is not None:
            answer = orjson.loads(self._await_reply(reply_tp, start, request, timeout))
            if not answer["ok"]:
                raise AwakeableError(f"awakeable {awakeable_id} was not completed: {answer['error']}")

    def _replies_consumer(self) -> Consumer:
        if self._consumer is None:
            self._consumer = Consumer({**self._admin_conf, "group.id": "oncely-client", "enable.auto.commit": False,
                                       "isolation.level": "read_committed", "enable.partition.eof": False,
                                       "fetch.wait.max.ms": 10})  # an answer is read as soon as it commits
        return self._consumer

    def _reply_start(self, tp: TopicPartition) -> int:
        try:
            _, high = self._replies_consumer().get_watermark_offsets(tp, timeout=10)
        except KafkaException as e:
            raise ConfigError(f"cannot read topic {tp.topic}: {e} (start the app once with oncely run "
                              "to create it)") from None
        return high

    def _await_reply(self, tp: TopicPartition, start: int, request: bytes, timeout: float) -> bytes:
        consumer = self._replies_consumer()
        consumer.assign([TopicPartition(tp.topic, tp.partition, start)])
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                m = consumer.poll(min(0.5, max(0.0, deadline - time.monotonic())))  # returns at the first record
                if m is not None and m.error() is None and m.key() == request:
                    return m.value()
        finally:
            consumer.unassign()
        raise TimeoutError(f"no answer from app {tp.topic.rsplit('.', 1)[0]!r} in {timeout} s: is a processor "
                           "running? The completion is on the log and is applied when one runs")

    def flush(self, timeout: float = 60.0) -> None:
        left = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        if left or errors:
            raise RuntimeError(f"{left} records not acknowledged; errors: {errors[:5]}")

    def close(self) -> None:
        self.flush()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
