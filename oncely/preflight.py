"""Checks made before anything is created on Kafka, each failing with one
sentence that says what to fix: the app's settings, the Kafka settings
oncely owns, the Kafka settings librdkafka refuses, and whether the
bootstrap answers at all (a few seconds, instead of librdkafka retrying and
logging for half a minute)."""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from oncely.errors import ConfigError
from oncely.processor.clients import RESERVED

if TYPE_CHECKING:
    from oncely.app import App

# Errors after which waiting longer does not help.
_HOPELESS = {KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._AUTHENTICATION, KafkaError._SSL,
             KafkaError.SASL_AUTHENTICATION_FAILED}
_REFUSED = {KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED}
_OFFSET_RESETS = ("earliest", "smallest", "beginning", "latest", "largest", "end")


class _Discard:
    """A confluent-kafka logger that drops every line: the check reports the
    outcome in one sentence instead."""

    def log(self, *_: Any, **__: Any) -> None:
        pass


def kafka_origin(setting: str, fallback: str) -> str:
    """Where a Kafka setting came from, for messages: its ONCELY_KAFKA_*
    variable when that is set, else `fallback` (e.g. "App(kafka=...)")."""
    var = "ONCELY_KAFKA_" + setting.upper().replace(".", "_")
    return var if os.environ.get(var) else fallback


def _refused_setting(err: KafkaError, kafka: dict[str, Any], fallback: str) -> ConfigError:
    """librdkafka's refusal of a setting, naming where the setting came from."""
    quoted = re.findall(r'"([^"]+)"', err.str())
    name = quoted[-1] if quoted else None
    if name is None or name not in kafka:
        return ConfigError(f"Kafka refused the client settings: {err.str()}")
    return ConfigError(f"Kafka setting {name}={kafka[name]!r} (from {kafka_origin(name, fallback)}) is refused: "
                       f"{err.str()}")


def check_app_settings(app: "App") -> None:
    """The app's own settings and the Kafka settings oncely sets itself."""
    cfg = app.config
    if not cfg.bootstrap:
        raise ConfigError("no Kafka bootstrap address: pass --bootstrap HOST:PORT, App(..., bootstrap=...) "
                          "or set ONCELY_KAFKA_BOOTSTRAP")
    owned = sorted(RESERVED & set(cfg.kafka))
    if owned:
        raise ConfigError(f"Kafka setting {owned[0]} (from {kafka_origin(owned[0], 'App(kafka=...)')}) is set by "
                          "oncely itself: remove it")
    for name in ("linger.ms", "queue.buffering.max.ms"):  # (one setting, two names)
        linger = cfg.kafka.get(name)
        try:
            too_long = linger is not None and float(linger) >= cfg.transaction_timeout_ms
        except (TypeError, ValueError):
            continue  # not a number: librdkafka refuses it, and `connect` says so
        if too_long:
            raise ConfigError(f"Kafka setting {name}={linger!r} (from {kafka_origin(name, 'App(kafka=...)')}) must be "
                              f"below transaction_timeout_ms={cfg.transaction_timeout_ms}, the producer's "
                              "message.timeout.ms")
    reset = str(cfg.kafka.get("auto.offset.reset", "earliest")).lower()
    if reset not in _OFFSET_RESETS:
        raise ConfigError(f"auto.offset.reset={reset!r} (from {kafka_origin('auto.offset.reset', 'App(kafka=...)')})"
                          ": use 'earliest' or 'latest'")
    for name in ("commit_interval", "max_batch", "transaction_timeout_ms", "txn_call_timeout", "session_timeout_ms",
                 "max_poll_interval_ms", "max_inflight_per_partition", "suspend_after"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"setting {name}={getattr(cfg, name)!r} must be positive")
    if not 0 <= cfg.commit_drain_share < 1:
        raise ConfigError(f"setting commit_drain_share={cfg.commit_drain_share!r} must be in [0, 1)")
    if cfg.commit_interval * 1000 >= cfg.transaction_timeout_ms:
        raise ConfigError(f"commit_interval={cfg.commit_interval} s must be well below transaction_timeout_ms="
                          f"{cfg.transaction_timeout_ms}")


def connect(bootstrap: str, kafka: dict[str, Any] | None = None, origin: str = "--kafka",
            timeout: float = 5.0) -> AdminClient:
    """An AdminClient on `bootstrap` once a broker answered, within about
    `timeout` seconds. Raises ConfigError naming a Kafka setting librdkafka
    refuses (`origin` says where settings not from the environment came
    from), or saying that no broker answers."""
    kafka = dict(kafka or {})
    errors: list[KafkaError] = []
    try:
        admin = AdminClient({"logger": _Discard(), **kafka, "bootstrap.servers": bootstrap, "error_cb": errors.append})
    except KafkaException as e:
        raise _refused_setting(e.args[0], kafka, origin) from None
    t0 = time.monotonic()
    while True:
        try:
            if admin.list_topics(timeout=0.5).brokers:
                return admin
        except KafkaException as e:
            errors.append(e.args[0])
        admin.poll(0)
        elapsed = time.monotonic() - t0
        hopeless = any(e.code() in _HOPELESS for e in errors)
        if elapsed >= timeout or (hopeless and elapsed >= 1.0):
            break
    refused = [e for e in errors if e.code() in _REFUSED]
    if refused:
        raise ConfigError(f"Kafka at {bootstrap} refused the connection: {refused[-1].str()}: check the SASL/SSL "
                          "settings (kafka=..., --kafka or ONCELY_KAFKA_*)")
    raise ConfigError(f"cannot reach Kafka at {bootstrap}: is a broker running? (`oncely kafka start`)")


def connect_app(app: "App", timeout: float = 5.0) -> AdminClient:
    """Everything that can be checked before the app's topics are created:
    its settings, then its Kafka settings and the broker (see `connect`)."""
    check_app_settings(app)
    return connect(app.config.bootstrap, app.config.kafka, "App(kafka=...)", timeout)  # type: ignore[arg-type]
