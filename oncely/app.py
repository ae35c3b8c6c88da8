"""`App`, services and handlers: what a user declares."""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Awaitable, Callable

from oncely.config import AppConfig
from oncely.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_APP_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for handler failures other than TerminalError.

    Attempt n (n >= 1 failures so far) waits initial * factor**(n-1), capped at
    max_interval. After `max_attempts` failed attempts the invocation fails
    and a dead letter is written.
    """

    max_attempts: int = 10
    initial_interval: float = 0.1
    factor: float = 2.0
    max_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts must be at least 1 (1 means: no retries)")
        if self.initial_interval < 0 or self.max_interval < 0 or self.factor < 1:
            raise ConfigError("RetryPolicy intervals must be >= 0 and factor >= 1")

    def delay(self, failures: int) -> float:
        return min(self.max_interval, self.initial_interval * self.factor ** max(0, failures - 1))


Fn = Callable[..., Awaitable[Any]]


class Handler:
    """A registered handler; pass it to `Client.send` or `ctx.call` as a target."""

    def __init__(self, service: "Service", name: str, fn: Fn) -> None:
        self.service = service
        self.name = name
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise ConfigError(f"handler {service.name}.{name} must take ctx as its first parameter")
        self.takes_input = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)

    def __repr__(self) -> str:
        return f"<handler {self.service.name}.{self.name}>"


class RemoteHandler:
    """A handler of a remote service: only its name and whether it takes an
    input are known here (from the deployment's manifest); it runs behind
    the deployment's endpoint. A send or call target like any handler."""

    fn = None

    def __init__(self, service: "Service", name: str, takes_input: bool) -> None:
        self.service = service
        self.name = name
        self.takes_input = takes_input

    def __repr__(self) -> str:
        return f"<remote handler {self.service.name}.{self.name}>"


class Service:
    """A set of handlers. Keyed services run one invocation per key at a time
    and have per-key state; stateless services run concurrently."""

    def __init__(self, app: "App", name: str, keyed: bool, retry: RetryPolicy) -> None:
        self.app = app
        self.name = name
        self.keyed = keyed
        self.retry = retry
        self.handlers: dict[str, Handler] = {}
        # The deployment (dp_…) whose endpoint runs this service's handlers;
        # None for handlers defined in this process.
        self.deployment: str | None = None

    def handler(self, fn: Fn | None = None, *, name: str | None = None) -> Any:
        """Decorator registering an `async def h(ctx[, input])` handler."""

        def register(f: Fn) -> Handler:
            if not inspect.iscoroutinefunction(f):
                raise ConfigError(f"handler {self.name}.{f.__name__} must be an `async def` function")
            hname = name or f.__name__
            if not _NAME.match(hname):
                raise ConfigError(f"handler name {hname!r} may use only letters, digits, '_' and '-'")
            if hname in self.handlers:
                raise ConfigError(f"service {self.name!r} already has a handler {hname!r}")
            h = Handler(self, hname, f)
            self.handlers[hname] = h
            return h

        return register(fn) if fn is not None else register

    def __getattr__(self, item: str) -> Handler:
        handlers = self.__dict__.get("handlers", {})
        if item in handlers:
            return handlers[item]
        raise AttributeError(f"service {self.__dict__.get('name')!r} has no handler {item!r}")

    def __repr__(self) -> str:
        return f"<{'keyed' if self.keyed else 'stateless'} service {self.name}>"


class App:
    """An oncely application: its services, and the topics `<name>.log`,
    `<name>.changelog` and `<name>.dlq` with `partitions` partitions (fixed at
    creation; changing it is a migration).

    Every AppConfig setting is a keyword argument (e.g. `max_batch=1000`,
    `create_sink_topics=True`); a setting not given comes from its
    ONCELY_<SETTING> variable, else its default."""

    def __init__(
        self,
        name: str,
        partitions: int = 8,
        *,
        bootstrap: str | None = None,
        state_dir: str | None = None,
        commit_interval: float | None = None,
        kafka: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
        deployments: list[str] | None = None,
        **settings: Any,
    ) -> None:
        if not _APP_NAME.match(name) or len(name) > 200:
            raise ConfigError(
                f"App name {name!r} must be a valid Kafka topic prefix: letters, digits, '.', '_' and '-'"
            )
        if not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"App partitions must be a positive int, got {partitions!r}")
        self.name = name
        self.partitions = partitions
        self.services: dict[str, Service] = {}
        self.subscriptions: list[Any] = []
        self.sinks: dict[str, Any] = {}
        self.default_retry = retry or RetryPolicy()
        self.config = AppConfig()
        self.config.load_env(dict(os.environ))
        named = {"bootstrap": bootstrap or None, "state_dir": state_dir, "commit_interval": commit_interval,
                 "kafka": kafka}
        self.config.update({**{k: v for k, v in named.items() if v is not None}, **settings}, f"App({name!r})")
        if deployments is None:
            deployments = [u.strip() for u in os.environ.get("ONCELY_DEPLOYMENTS", "").split(",") if u.strip()]
        if not isinstance(deployments, list) or not all(isinstance(u, str) and u for u in deployments):
            raise ConfigError("App deployments must be a list of endpoint URLs")
        # Endpoints whose services run remote; registered when the processor starts.
        self.deployments: list[str] = list(deployments)
        self.remote_deployments: dict[str, Any] = {}  # by id: what is registered (remote/watch.py keeps it)

    # topics
    @property
    def log_topic(self) -> str:
        return f"{self.name}.log"

    @property
    def changelog_topic(self) -> str:
        return f"{self.name}.changelog"

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}.dlq"

    @property
    def replies_topic(self) -> str:
        """Answers to requests from outside (awakeable resolutions)."""
        return f"{self.name}.replies"

    @property
    def deployments_topic(self) -> str:
        """Registered remote deployments (compacted; remote/deployments.py)."""
        return f"{self.name}.deployments"

    @property
    def internal_topics(self) -> set[str]:
        return {self.log_topic, self.changelog_topic, self.dlq_topic, self.replies_topic, self.deployments_topic}

    def _add(self, name: str, keyed: bool, retry: RetryPolicy | None) -> Service:
        if not _NAME.match(name):
            raise ConfigError(f"service name {name!r} may use only letters, digits, '_' and '-'")
        if name in self.services:
            raise ConfigError(f"app {self.name!r} already has a service {name!r}")
        svc = Service(self, name, keyed, retry or self.default_retry)
        self.services[name] = svc
        return svc

    def keyed(self, name: str, *, retry: RetryPolicy | None = None) -> Service:
        """A keyed service: exclusive per key, in log order, with per-key state."""
        return self._add(name, True, retry)

    def service(self, name: str, *, retry: RetryPolicy | None = None) -> Service:
        """A stateless service: invocations run concurrently, without state."""
        return self._add(name, False, retry)

    def add_remote_service(self, name: str, keyed: bool, retry: RetryPolicy, handlers: dict[str, bool],
                           deployment: str) -> Service | None:
        """A service that `deployment`'s endpoint runs (from its manifest):
        `handlers` maps each handler name to whether it takes an input. A
        service this process defines itself stays in-process (None). A
        remote service known already is updated in place (a newer
        deployment took it over), so what holds it sees the change."""
        current = self.services.get(name)
        if current is not None and current.deployment is None:
            return None
        bad = [n for n in (name, *handlers) if not _NAME.match(n)]
        if bad:
            raise ConfigError(f"deployment {deployment}: names {bad} may use only letters, digits, '_' and '-'")
        svc = current or Service(self, name, keyed, retry)
        svc.keyed, svc.retry, svc.deployment = keyed, retry, deployment
        remote = {h: RemoteHandler(svc, h, takes_input) for h, takes_input in handlers.items()}
        svc.handlers = remote  # type: ignore[assignment]
        self.services[name] = svc
        return svc

    def subscribe(
        self,
        topics: str | list[str],
        target: Handler | str,
        *,
        key: Callable[[Any], Any] | None = None,
        value: str | Callable[[bytes | None], Any] = "json",
        idempotency: str | Callable[[Any], Any] | None = None,
        idempotency_retention: timedelta | float = timedelta(hours=24),
        max_bytes: int | None = None,
        name: str | None = None,
    ) -> Any:
        """Feed every record of `topics` to `target`, exactly once.

        target: a handler of this app, or a deployment's "service/handler".
        key: the routing key for keyed targets, a function of the record
        (`rec.value` is decoded); default: the record's key.
        value: "json", "bytes", "avro:<path to .avsc>" or a callable on the
        raw bytes. idempotency: "header:<name>", a callable on the record, or
        None (deduplicate by topic/partition/offset). Records that cannot be
        decoded or keyed, or are larger than max_bytes, go to the DLQ.
        """
        from oncely.ingest.subscription import (DEFAULT_MAX_BYTES, HandlerRef, Subscription, make_decoder,
                                                make_idempotency)

        names = [topics] if isinstance(topics, str) else list(topics)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ConfigError("subscribe: give a topic name or a non-empty list of them")
        internal = self.internal_topics
        if internal & set(names):
            raise ConfigError(f"subscribe: {sorted(internal & set(names))} is one of the app's own topics")
        if isinstance(target, str):
            target = HandlerRef.named(self, target)  # type: ignore[assignment]
        elif not isinstance(target, Handler) or target.service.app is not self:
            raise ConfigError("subscribe: the target must be a handler of this app (e.g. counter.add)")
        svc = target.service_name if isinstance(target, HandlerRef) else target.service.name
        if key is not None and not callable(key):
            raise ConfigError("subscribe: key must be a function of the record (or None for the record key)")
        retention = idempotency_retention if isinstance(idempotency_retention, timedelta) else timedelta(
            seconds=float(idempotency_retention))
        if retention <= timedelta(0):
            raise ConfigError("subscribe: idempotency_retention must be positive")
        sub_name = name or f"{','.join(names)}->{svc}/{target.name}"
        if any(s.name == sub_name for s in self.subscriptions):
            raise ConfigError(f"subscribe: there is already a subscription named {sub_name!r}; pass name=")
        sub = Subscription(sub_name, tuple(names), target, make_decoder(value),  # type: ignore[arg-type]
                           key, make_idempotency(idempotency), retention, max_bytes or DEFAULT_MAX_BYTES)
        self.subscriptions.append(sub)
        return sub

    def sink(self, topic: str, *, value: Any = "json", partitions: int | None = None) -> Any:
        """Declare a user topic handlers emit to, with its value format:
        "json" (default), "bytes" or "avro:<path to .avsc>" (validated now).
        At start the topic must exist, or is created with `partitions`
        (default: the app's) when create_sink_topics is on."""
        from oncely.egress.sinks import Sink, make_serializer

        if not isinstance(topic, str) or not topic:
            raise ConfigError("sink: give the topic name")
        if topic in self.internal_topics:
            raise ConfigError(f"sink: {topic!r} is one of the app's own topics")
        if topic in self.sinks:
            raise ConfigError(f"sink: topic {topic!r} is already declared")
        if partitions is not None and (not isinstance(partitions, int) or partitions < 1):
            raise ConfigError("sink: partitions must be a positive int")
        sink = Sink(topic, make_serializer(value), partitions)
        self.sinks[topic] = sink
        return sink

    def subscription(self, name: str) -> Any:
        for s in self.subscriptions:
            if s.name == name:
                return s
        return None

    @property
    def source_topics(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.subscriptions:
            for t in s.topics:
                seen[t] = None
        return list(seen)

    def lookup(self, service: str, handler: str) -> Handler | None:
        svc = self.services.get(service)
        return svc.handlers.get(handler) if svc else None
