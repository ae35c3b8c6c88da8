"""Requests from outside the app (the HTTP gateway, `Client.call`),
answered on `<app>.replies` in the partition's open transaction.

A caller names where it waits with `reply {request_id, partition}`: on an
Invoke (a call), an Attach or a ReadState. An answer joins the transaction
that applies the record, so it is visible (read_committed) exactly when
what it reports is committed: a reply can never announce a result that a
crash then takes back. A caller that attaches to an invocation still in
flight (a repeated call with the same idempotency key, or an Attach) is
remembered in the store (`keys.waiters`) in that same transaction and is
answered by the transaction that finishes the invocation, also across
crashes, rewinds and suspension.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.processor import keys
from oncely.processor.invocation import COMPLETED, FAILED

if TYPE_CHECKING:
    from oncely.processor.invocation import Invocation
    from oncely.processor.partition import PartitionProcessor

_WAITER = struct.Struct(">16sI")  # request id, replies partition
DELAY_INDEX = 0xFFFFFFFF  # the journal index of an outside delayed send's timer (it has no journal)


def reply(part: PartitionProcessor, to: dict[str, Any], inv_id: bytes | None, status: str,
          value: bytes | None = None, error: str | None = None,
          entries: dict[str, bytes] | None = None) -> None:
    record = schemas.encode("reply", {"invocation_id": inv_id, "status": status, "value": value,
                                      "error": error, "entries": entries})
    part.out.produce(part.app.replies_topic, to["request_id"], record, partition=to["partition"])


def finished(part: PartitionProcessor, inv: Invocation, value: bytes | None, error: str | None) -> None:
    """An invocation completed (error None) or failed: answer its own
    caller and every attached one."""
    status = "completed" if error is None else "failed"
    to = inv.invoke.get("reply")
    if to is not None:
        reply(part, to, inv.id, status, value, error)
    if not part.waiters:
        return  # (most invocations: no store lookup)
    wkey = keys.waiters(inv.id)
    raw = part.store.get(wkey)
    if raw is not None:
        part.store.delete(wkey)
        part.waiters -= 1
        for request_id, partition in _WAITER.iter_unpack(raw):
            reply(part, {"request_id": request_id, "partition": partition}, inv.id, status, value, error)


def add_waiter(part: PartitionProcessor, inv_id: bytes, to: dict[str, Any]) -> None:
    wkey = keys.waiters(inv_id)
    old = part.store.get(wkey)
    if old is None:
        part.waiters += 1
    part.store.put(wkey, (old or b"") + _WAITER.pack(to["request_id"], to["partition"]))


def outcome(part: PartitionProcessor, inv_id: bytes) -> tuple[str, bytes | None, str | None] | None:
    """(status, value, error) of a finished invocation this partition still
    remembers (its dedup entry, or its retained failure), else None."""
    raw = part.store.get(keys.dedup(inv_id))
    if raw is not None:
        d = schemas.decode("dedup_entry", raw)
        return ("failed", None, d["error"]) if d["failed"] else ("completed", d["result"], None)
    raw = part.store.get(keys.failed(inv_id))
    if raw is not None:
        return "failed", None, schemas.decode("invocation_status", raw)["error"]
    return None


def on_duplicate(part: PartitionProcessor, inv_id: bytes, phase: str, to: dict[str, Any]) -> None:
    """A repeated call (same idempotency key): attach it to the invocation."""
    if phase in (COMPLETED, FAILED):
        done = outcome(part, inv_id)
        if done is not None:
            reply(part, to, inv_id, *done)
            return
    add_waiter(part, inv_id, to)


def on_attach(part: PartitionProcessor, body: dict[str, Any]) -> None:
    inv_id, to = body["invocation_id"], body["reply"]
    phase = part.lookup(inv_id)
    if phase is None:
        reply(part, to, inv_id, "unknown")
    elif phase in (COMPLETED, FAILED):
        reply(part, to, inv_id, *(outcome(part, inv_id) or ("unknown", None, None)))
    elif body["wait"]:
        add_waiter(part, inv_id, to)
    else:
        reply(part, to, inv_id, "running", error=phase)


def on_read_state(part: PartitionProcessor, body: dict[str, Any]) -> None:
    """The key's state as committed by the invocations finished before this
    record (an invocation in flight has not written its changes yet)."""
    to, service = body["reply"], body["service"]
    svc = part.app.services.get(service)
    if svc is None or not svc.keyed:
        reply(part, to, None, "unknown", error=f"no keyed service {service!r}")
        return
    sk = keys.service_key(service, body["key"])
    name = body["name"]
    if name is not None:
        entries = {}
        value = part.store.get(keys.state(sk, name))
        if value is not None:
            entries[name] = value
    else:
        prefix = keys.state_prefix(sk)
        entries = {k[len(prefix):].decode(): v for k, v in part.store.scan(prefix)}
    reply(part, to, None, "state", entries=entries)


def on_delay(part: PartitionProcessor, body: dict[str, Any]) -> None:
    """A delayed one-way send from outside: a durable SEND timer here."""
    at, inv_id = body["at_ms"], body["invocation_id"]
    if part.store.get(keys.timer(at, inv_id, DELAY_INDEX)) is not None:
        return  # the same record again (a retried request)
    part.timers.add(at, inv_id, DELAY_INDEX, {
        "kind": "SEND", "partition": body["partition"], "routing_key": body["routing_key"],
        "record": body["record"]})
