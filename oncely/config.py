"""`AppConfig`: the settings of a processor process, from App arguments,
CLI options and ONCELY_* environment variables, each checked at start."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from oncely.errors import ConfigError


@dataclass
class AppConfig:
    """Settings of a processor process. Every scalar field can be set from the
    environment as ONCELY_<FIELD> (e.g. ONCELY_COMMIT_INTERVAL=0.05); App
    arguments and CLI options override the environment."""

    bootstrap: str | None = None
    state_dir: str = ".state"
    commit_interval: float = 0.1
    max_batch: int = 5000
    transaction_timeout_ms: int = 10_000
    # Timeout of one blocking transaction call (send offsets, commit, abort).
    # Its outcome is then unknown, so the producer is replaced and the
    # partitions rewind; a call that does not return 2 s after it (librdkafka
    # sometimes ignores its own timeout) is abandoned the same way.
    txn_call_timeout: float = 5.0
    session_timeout_ms: int = 10_000
    # Static group membership (KIP-345) with a group.instance.id kept in the
    # state dir: a process restarted with the same state dir gets its
    # partitions back at once, without a rebalance. The price: a process
    # stopped for good keeps its partitions until session_timeout_ms passes
    # (turn it off for scale-down by stopping; see the README).
    static_membership: bool = True
    max_poll_interval_ms: int = 300_000
    net_effects: bool = True
    # Invocations of one log partition in memory at once (paused ones do not
    # count); more wait in the store, in log order (the durable inbox).
    max_inflight_per_partition: int = 500
    # Before a commit, stop consuming for up to this share of the commit
    # interval and let runnable invocations finish, so only invocations that
    # really wait on something are persisted (net effects).
    commit_drain_share: float = 0.3
    # An invocation waiting (on a call, sleep or awakeable) without progress
    # for this many seconds is suspended: its coroutine is dropped and it
    # lives only in the store until its completion arrives, then it resumes
    # by journal replay. Memory then does not grow with waiting invocations.
    suspend_after: float = 60.0
    # Create declared sink topics that do not exist (else: refuse to start).
    create_sink_topics: bool = False
    # Remote handlers: how long an invocation retries an endpoint that cannot
    # be reached (connect errors, timeouts, 5xx/429/408) before it is PAUSED
    # (attempts are not counted: the handler decided nothing); the bytes of
    # a key's state sent with each request before the rest is fetched on
    # demand; the request deadline the endpoint works within.
    remote_transport_budget: float = 300.0
    remote_eager_state_bytes: int = 64 * 1024
    remote_deadline_ms: int = 10_000
    # Items per request to an endpoint (≤ its manifest's), wait after the first.
    remote_max_batch: int = 32
    remote_linger: float = 0.002
    # Bearer token the HTTP ingress requires on every route but health
    # (`--http-token`, ONCELY_HTTP_TOKEN); None: no token (keep it on loopback).
    http_token: str | None = None
    kafka: dict[str, str] = field(default_factory=dict)

    def load_env(self, env: dict[str, str]) -> None:
        """Apply ONCELY_<FIELD> variables; a malformed value is a ConfigError."""
        for f in fields(self):
            name = f"ONCELY_{f.name.upper()}"
            raw = env.get(name)
            if f.name == "kafka" or raw is None or raw == "":
                continue
            kind = _kind(f)
            try:
                if kind is bool:
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    value: Any = raw.lower() in ("1", "true", "yes")
                else:
                    value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            setattr(self, f.name, value)
        if env.get("ONCELY_KAFKA_BOOTSTRAP"):
            self.bootstrap = env["ONCELY_KAFKA_BOOTSTRAP"]
        self.kafka.update(kafka_from_env(env))

    def update(self, settings: dict[str, Any], where: str = "App()") -> None:
        """Apply settings given as arguments (they win over the environment).
        An unknown name or a value of the wrong type is a ConfigError."""
        known = {f.name: f for f in fields(self)}
        for name, value in settings.items():
            f = known.get(name)
            if f is None:
                raise ConfigError(f"{where} got an unknown setting {name!r}; the settings are: "
                                  f"{', '.join(sorted(known))}")
            if value is None and f.default is None:  # an optional setting left unset
                setattr(self, name, None)
                continue
            kind = _kind(f)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                article = "an" if kind.__name__[0] in "aeiou" else "a"
                raise ConfigError(f"{where} setting {name}={value!r} must be {article} {kind.__name__}")
            if kind is dict:
                self.kafka.update({str(k): v for k, v in value.items()})
            else:
                setattr(self, name, value)


def _kind(f: Any) -> type:
    """The type a setting takes, from its default (bootstrap: str)."""
    if f.default_factory is not MISSING:
        return type(f.default_factory())
    return str if f.default is None else type(f.default)


def kafka_from_env(env: dict[str, str]) -> dict[str, str]:
    """Kafka client settings from ONCELY_KAFKA_<SETTING> variables:
    ONCELY_KAFKA_SECURITY_PROTOCOL=SASL_SSL is security.protocol=SASL_SSL
    (lower case, '_' -> '.'); ONCELY_KAFKA_BOOTSTRAP is the bootstrap."""
    return {name[len("ONCELY_KAFKA_"):].lower().replace("_", "."): raw for name, raw in env.items()
            if name.startswith("ONCELY_KAFKA_") and name != "ONCELY_KAFKA_BOOTSTRAP" and raw != ""}
