"""Exactly-once delivery between partitions: the records of send and call.

A handler's send or call is an Invoke produced in the caller's transaction,
with an id derived from the caller's id and journal index, so a replay of the
caller produces the same id and the callee's partition drops the second
delivery. A call's outcome travels back as a Response in the callee's
transaction, addressed to the caller's journal entry; the caller's partition
completes that entry once (a second Response finds it completed). Each
function here builds one such record and says where it goes; the partition
produces it into its open transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from oncely import schemas
from oncely.observe.tracing import child_traceparent
from oncely.shuffle.envelope import invoke_record
from oncely.shuffle.ids import child_id, format_id
from oncely.shuffle.routing import partition_for
from oncely.shuffle.targets import Target


@dataclass(frozen=True, slots=True)
class Delivery:
    """A record for a log partition (or the replies topic)."""

    key: bytes
    partition: int
    value: bytes


def child_invoke(parent: bytes, index: int, t: Target, partitions: int,
                 reply_to: int | None) -> tuple[bytes, Delivery]:
    """The Invoke of a send (`reply_to` None) or of a call whose Response
    goes to log partition `reply_to`; returns the callee's id with it."""
    callee = child_id(parent, index)
    caller = None if reply_to is None else {"invocation_id": parent, "partition": reply_to, "journal_index": index}
    # A delivery seen twice is recognised by the callee's partition.
    record = invoke_record(callee, t.service, t.handler, t.key, t.payload, t.payload_format,
                           idempotency_key=f"child:{format_id(parent)}:{index}", caller=caller,
                           traceparent=child_traceparent())
    routing = t.key if t.key is not None else callee
    return callee, Delivery(routing, partition_for(routing, partitions), record)


def response(caller: dict[str, Any], callee: bytes, value: bytes | None, failure: str | None) -> Delivery:
    """A callee's outcome for its caller's journal entry."""
    record = schemas.encode("log_record", {"body": ("oncely.Response", {
        "invocation_id": caller["invocation_id"], "journal_index": caller["journal_index"],
        "value": value, "failure": failure})})
    return Delivery(caller["invocation_id"], caller["partition"], record)


def awakeable_reply(request: bytes, error: str | None, partitions: int) -> Delivery:
    """The answer to whoever resolved or rejected an awakeable (replies topic)."""
    return Delivery(request, partition_for(request, partitions), orjson.dumps({"ok": error is None, "error": error}))


def awakeable_result(inv_id: bytes, index: int, value: bytes | None, failure: str | None,
                     request: bytes | None) -> bytes:
    """The log record that resolves (value) or rejects (failure) an
    awakeable; `request` names the resolver's reply, if it waits for one."""
    return schemas.encode("log_record", {"body": ("oncely.AwakeableResult", {
        "invocation_id": inv_id, "journal_index": index, "value": value, "failure": failure,
        "request_id": request})})
