"""`Client`: invoke handlers from outside an app by producing to its log."""

from __future__ import annotations

import os
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from oncely.app import App, Handler
from oncely.errors import ConfigError
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import format_id, idempotent_id, random_id
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
        conf = {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5, **(kafka or {})}
        self._producer = Producer(conf)
        self._admin_conf = {"bootstrap.servers": self.bootstrap, **(kafka or {})}
        self._partitions: dict[str, int] = {}
        self._errors: list[str] = []

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

    def flush(self, timeout: float = 60.0) -> None:
        left = self._producer.flush(timeout)
        errors, self._errors = self._errors, []
        if left or errors:
            raise RuntimeError(f"{left} records not acknowledged; errors: {errors[:5]}")

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
