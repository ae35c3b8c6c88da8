"""Source record -> an Invoke on the log partition of its routing key, or a
dead letter that says why. Pure: the caller produces the result inside its
transaction (the processor) or with its own producer (replay). The Invoke
stays a dict until it goes to the log: the processor starts most of them
without encoding them at all (processor/local_start.py)."""

from __future__ import annotations

from dataclasses import dataclass
from time import time_ns
from typing import Any

from oncely.egress.dead_letters import dead_letter
from oncely.ingest.subscription import SourceRecord, Subscription, idempotency_text
from oncely.observe.tracing import header_traceparent
from oncely.shuffle.envelope import DECODED, encode_invoke
from oncely.shuffle.ids import idempotent_id, source_record_id
from oncely.shuffle.routing import partition_for
from oncely.shuffle.targets import key_bytes

H_SUBSCRIPTION = "oncely.subscription"


@dataclass(slots=True)
class Routed:
    partition: int
    key: bytes  # the routing key
    invoke: dict[str, Any]
    invocation_id: bytes

    @property
    def value(self) -> bytes:
        """The Invoke's log record."""
        return encode_invoke(self.invoke)


@dataclass(slots=True)
class Dead:
    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def _dead(app: str, sub: Subscription, reason: str, error: str, msg: Any) -> Dead:
    source = {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}
    k, v, h = dead_letter(app, reason, error, msg.key(), msg.value(), target=f"{sub.target.service.name}/"
                          f"{sub.target.name}", source=source, extra={H_SUBSCRIPTION: sub.name})
    # Keep the record's own headers after ours, as Kafka Connect does.
    return Dead(reason, k, v, h + [(name, val if val is not None else b"") for name, val in (msg.headers() or [])])


def route(app: str, partitions: int, sub: Subscription, msg: Any, id_salt: str | None = None,
          replayed: bool = False) -> Routed | Dead:
    """Decide what a source record becomes. `id_salt` (replay --new-ids)
    gives every invocation a new id, so nothing is deduplicated.

    A record without an idempotency key of its own is read once: its Invoke
    and its source offset share a transaction, so it carries no idempotency
    key (no duplicate check, no dedup entry). Only a `replayed` one, which
    the live path may have made already, is deduplicated by its coordinates."""
    raw: bytes | None = msg.value()
    rkey: bytes | None = msg.key()
    size = (len(raw) if raw is not None else 0) + (len(rkey) if rkey is not None else 0)
    if size > sub.max_bytes:
        return _dead(app, sub, "too-large", f"the record has {size} bytes; the subscription allows "
                     f"max_bytes={sub.max_bytes}", msg)
    try:
        decoder = sub.decoder
        value = decoder.loads(raw) if raw is not None and decoder.loads is not None else decoder.decode(raw)
    except Exception as e:
        return _dead(app, sub, "undecodable", f"value is not {sub.decoder.name}: {e}", msg)
    raw_headers = msg.headers()
    headers = tuple(raw_headers) if raw_headers else ()
    source_headers: list[dict[str, Any]] = []  # (the Invoke's form; a loop: a comprehension is a call in 3.11)
    traced = False
    for name, hv in headers:
        source_headers.append({"name": name, "value": hv})
        traced = traced or name == "traceparent"
    ts = msg.timestamp()[1]
    topic, source_partition, offset = msg.topic(), msg.partition(), msg.offset()
    service, handler, keyed, target_name, payload_format, reencoded_by = sub.invoke_fields
    # The record as key and idempotency functions see it; most subscriptions have neither.
    rec = SourceRecord(topic, source_partition, offset, ts, rkey, headers, value) if (
        sub.key is not None or sub.idempotency is not None or id_salt is not None or replayed) else None
    kb: bytes | None = None
    if keyed:
        if sub.key is not None:
            try:
                kb = key_bytes(sub.key(rec))
            except Exception as e:
                return _dead(app, sub, "key-error", f"the key function raised {type(e).__name__}: {e}", msg)
            if kb is None:
                return _dead(app, sub, "missing-key", f"keyed target {service}/{handler} needs a routing key; "
                             "the key function returned None", msg)
        else:
            kb = rkey
            if kb is None:
                return _dead(app, sub, "missing-key", f"keyed target {service}/{handler} needs a routing key; "
                             "the record's key is null", msg)
    idem: str | None = None
    if sub.idempotency is not None:
        try:
            found = sub.idempotency(rec)
        except Exception as e:
            return _dead(app, sub, "idempotency-error", f"the idempotency function raised {type(e).__name__}: {e}",
                         msg)
        if found is not None:
            idem = idempotency_text(found)
    if id_salt is not None:
        idem = f"{idem or _coordinates(rec)}#{id_salt}"  # type: ignore[arg-type]
        inv_id = idempotent_id(service, handler, kb, idem)
    elif idem is not None:
        inv_id = idempotent_id(service, handler, kb, idem)
    else:
        # The id comes from the coordinates: a replay of the record is the same invocation.
        inv_id = source_record_id(topic, source_partition, offset, target_name)
        if replayed:
            idem = _coordinates(rec)  # type: ignore[arg-type]
    # invoke_body's dict, made here without its keyword call (once per record;
    # a unit test holds the two to the same fields).
    invoke = {
        "invocation_id": inv_id, "service": service, "handler": handler, "key": kb,
        "payload": raw if raw is not None else b"", "payload_format": payload_format, "idempotency_key": idem,
        "idempotency_retention_ms": sub.retention_ms, "caller": None,
        "source": {"topic": topic, "partition": source_partition, "offset": offset, "timestamp_ms": ts, "key": rkey,
                   "headers": source_headers},
        "subscription": reencoded_by, "created_at_ms": time_ns() // 1_000_000, DECODED: value,
    }
    if traced:
        traceparent = header_traceparent(headers)
        if traceparent is not None:
            invoke["traceparent"] = traceparent
    routing = kb if kb is not None else inv_id
    return Routed(partition_for(routing, partitions), routing, invoke, inv_id)


def _coordinates(rec: SourceRecord) -> str:
    return f"{rec.topic}/{rec.partition}/{rec.offset}"
