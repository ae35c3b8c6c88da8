"""Read an app's state and invocations back from its changelog.

The changelog (read_committed) is the source of truth; this is what
`oncely inspect` prints and what tests and the demo verify against. It reads
the whole changelog, so it is a tool for inspection, not a query path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.sdk.protocol import decode_value
from oncely.errors import ConfigError
from oncely.kafka_io import produce, read_to_end
from oncely.logs import kafka_conf_logging
from oncely.processor import keys
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import format_id, idempotent_id, parse_id
from oncely.shuffle.routing import partition_for

if TYPE_CHECKING:
    from oncely.app import App


def changelog_latest(bootstrap: str, app: str, timeout: float = 120.0,
                     config: dict[str, Any] | None = None) -> dict[bytes, bytes]:
    """Latest committed value per changelog key (tombstoned keys removed);
    `config`: extra librdkafka settings (SASL, SSL, ...)."""
    latest: dict[bytes, bytes | None] = {}
    try:
        records = read_to_end(bootstrap, f"{app}.changelog", timeout=timeout, config=config)
    except ValueError:
        raise ConfigError(f"app {app!r} has no topic {app}.changelog at {bootstrap}: check the name (an app's "
                          "topics are created when it first runs)") from None
    for r in records:
        latest[r.key] = r.value  # type: ignore[index]
    return {k: v for k, v in latest.items() if v is not None}


def parse_state_key(k: bytes) -> tuple[str, bytes, str]:
    """(service, key, name) of a state store key."""
    n = keys.service_key_length(k, 1)
    service, key = keys.split_service_key(k[1:1 + n])
    return service, key, k[1 + n:].decode()


def state_of(kv: dict[bytes, bytes]) -> dict[tuple[str, bytes, str], Any]:
    return {parse_state_key(k): decode_value(v) for k, v in kv.items() if k[:1] == keys.STATE}


def read_state(bootstrap: str, app: str, config: dict[str, Any] | None = None) -> dict[tuple[str, bytes, str], Any]:
    """Every (service, key, name) -> value the app's committed state holds."""
    return state_of(changelog_latest(bootstrap, app, config=config))


@dataclass
class InvocationInfo:
    id: str
    target: str
    key: bytes | None
    phase: str
    attempt: int
    error: str | None
    retried: str | None = None  # a FAILED one retried: "inv_... (completed)"


def retry_id(invoke: dict[str, Any]) -> bytes:
    """The id of the retry of a failed invocation: derived from its id, so
    retrying the same failure twice is recognised and runs once."""
    return idempotent_id(invoke["service"], invoke["handler"], invoke["key"], _retry_key(invoke))


def _retry_key(invoke: dict[str, Any]) -> str:
    return f"retry:{format_id(invoke['invocation_id'])}"


def _outcome(kv: dict[bytes, bytes], inv_id: bytes) -> str | None:
    """What became of an invocation, by what the changelog holds for it."""
    if keys.failed(inv_id) in kv:
        return "failed"
    if keys.status(inv_id) in kv or keys.queued(inv_id) in kv:
        return "in flight"
    dedup = kv.get(keys.dedup(inv_id))
    if dedup is not None:
        return "failed" if schemas.decode("dedup_entry", dedup)["failed"] else "completed"
    return None


def invocations_of(kv: dict[bytes, bytes]) -> list[InvocationInfo]:
    """Invocations that outlived a commit: in flight (inboxed, running,
    backing off, paused) and retained failures (with their retry, if any)."""
    out = []
    for k, v in kv.items():
        if k[:1] not in (keys.STATUS, keys.INBOX, keys.READY, keys.FAILED):
            continue
        st = schemas.decode("invocation_status", v)
        inv = st["invoke"]
        info = InvocationInfo(format_id(inv["invocation_id"]), f"{inv['service']}/{inv['handler']}", inv["key"],
                              st["phase"], st["attempt"], st["error"])
        if st["phase"] == "FAILED":
            rid = retry_id(inv)
            outcome = _outcome(kv, rid)
            info.retried = f"{format_id(rid)} ({outcome})" if outcome else None
        out.append(info)
    return sorted(out, key=lambda i: (i.phase, i.target, i.id))


def read_invocations(bootstrap: str, app: str, config: dict[str, Any] | None = None) -> list[InvocationInfo]:
    return invocations_of(changelog_latest(bootstrap, app, config=config))


@dataclass
class TimerInfo:
    fire_ms: int
    invocation: str
    index: int
    what: str  # "wake (sleep)" or "send service/handler key=..."


def timers_of(kv: dict[bytes, bytes]) -> list[TimerInfo]:
    """Durable timers in fire order: sleeps to wake, delayed sends to make."""
    out = []
    for k, v in kv.items():
        if k[:1] != keys.TIMER:
            continue
        fire_ms, inv_id, index = keys.parse_timer(k)
        timer = schemas.decode("timer", v)
        what = "wake (ctx.sleep)"
        if timer["kind"] == "SEND" and timer["record"] is not None:
            kind, body = schemas.decode("log_record", timer["record"])["body"]
            if kind == "oncely.Invoke":
                key = body["key"].decode(errors="backslashreplace") if body["key"] is not None else "-"
                what = f"send {body['service']}/{body['handler']} key={key}"
        out.append(TimerInfo(fire_ms, format_id(inv_id), index, what))
    return sorted(out, key=lambda t: (t.fire_ms, t.invocation, t.index))


def read_timers(bootstrap: str, app: str, config: dict[str, Any] | None = None) -> list[TimerInfo]:
    return timers_of(changelog_latest(bootstrap, app, config=config))


def retry_failed(bootstrap: str, app: str, ids: list[str] | None,
                 config: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Invoke failed invocations again (every retained one when `ids` is
    None): the same target, key, input and source record, under a new id
    derived from the failed one. Returns (failed id, retry id) pairs."""
    kv = changelog_latest(bootstrap, app, config=config)
    failed = {k[1:]: schemas.decode("invocation_status", v)["invoke"] for k, v in kv.items() if k[:1] == keys.FAILED}
    wanted = list(failed) if ids is None else []
    for text in ids or []:
        try:
            inv_id = parse_id(text)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if inv_id not in failed:
            raise ConfigError(f"{text} is not a failed invocation of app {app!r} (or its failure has expired): "
                              f"`oncely inspect invocations {app} --failed` lists them")
        wanted.append(inv_id)
    n = log_partitions(bootstrap, app, config)
    by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
    pairs = []
    for inv_id in wanted:
        invoke = failed[inv_id]
        rid = retry_id(invoke)
        routing = invoke["key"] if invoke["key"] is not None else rid
        by_partition.setdefault(partition_for(routing, n), []).append((routing, invoke_record(
            rid, invoke["service"], invoke["handler"], invoke["key"], invoke["payload"], invoke["payload_format"],
            idempotency_key=_retry_key(invoke), source=invoke["source"], subscription=invoke["subscription"])))
        pairs.append((format_id(inv_id), format_id(rid)))
    for partition, records in by_partition.items():
        produce(bootstrap, f"{app}.log", records, partition=partition, config=config)
    return pairs


def log_partitions(bootstrap: str, app: str, config: dict[str, Any] | None) -> int:
    from confluent_kafka.admin import AdminClient

    md = AdminClient({**kafka_conf_logging(), **(config or {}), "bootstrap.servers": bootstrap}).list_topics(
        f"{app}.log", timeout=10)
    t = md.topics.get(f"{app}.log")
    if t is None or t.error is not None:
        raise ConfigError(f"app {app!r} has no topic {app}.log at {bootstrap}")
    return len(t.partitions)


def restore_partitions(app: "App", partitions: list[int], wipe: bool = True) -> int:
    """Rebuild partitions' local stores from the changelog, with no processor
    running on this state dir (its lock is taken). Returns records applied."""
    from pathlib import Path

    from oncely.processor.identity import StateDirLock
    from oncely.processor.restore import Restorer
    from oncely.processor.store import PartitionStore

    cfg = app.config
    root = Path(cfg.state_dir) / app.name
    lock = StateDirLock(root)
    stores: dict[int, PartitionStore] = {}
    restorer = Restorer({**kafka_conf_logging(), "bootstrap.servers": cfg.bootstrap, **cfg.kafka}, app.changelog_topic,
                        24 * 3600 * 1000)
    try:
        for p in partitions:
            if not 0 <= p < app.partitions:
                raise ValueError(f"partition {p} is not one of {app.name}'s 0..{app.partitions - 1}")
            store = PartitionStore(root / str(p), app.name, app.partitions, p)
            store.open()
            if wipe:
                store.wipe()
            stores[p] = store
        return restorer.restore(stores)
    finally:
        for store in stores.values():
            store.close()
        restorer.close()
        lock.release()
