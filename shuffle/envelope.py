"""The log record envelope: every Invoke is encoded here, whoever sends it
(the Client, a subscription, a handler's send or call)."""

from __future__ import annotations

import time
from typing import Any

from oncely import schemas


# An Invoke's key (never encoded) holding a subscribed record's value as its
# route decoded it, so that the handler's first run does not decode it again.
DECODED = "decoded"


def invoke_record(*args: Any, **kwargs: Any) -> bytes:
    """An encoded LogRecord holding one Invoke; the arguments are
    `invoke_body`'s (`traceparent`: its W3C trace context, observe.tracing;
    `reply`: where an outside caller waits for its result, gateway/)."""
    return encode_invoke(invoke_body(*args, **kwargs))


def invoke_body(
    invocation_id: bytes,
    service: str,
    handler: str,
    key: bytes | None,
    payload: bytes,
    payload_format: str,
    *,
    idempotency_key: str | None = None,
    idempotency_retention_ms: int | None = None,
    caller: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    subscription: str | None = None,
    traceparent: str | None = None,
    reply: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An Invoke as its partition sees it once decoded: a subscribed record
    that starts on this process (processor/local_start.py) is never encoded."""
    body: dict[str, Any] = {
        "invocation_id": invocation_id, "service": service, "handler": handler, "key": key,
        "payload": payload, "payload_format": payload_format, "idempotency_key": idempotency_key,
        "idempotency_retention_ms": idempotency_retention_ms, "caller": caller, "source": source,
        "subscription": subscription, "created_at_ms": int(time.time() * 1000),
    }
    if traceparent is not None:
        body["traceparent"] = traceparent
    if reply is not None:
        body["reply"] = reply
    return body


def encode_invoke(body: dict[str, Any]) -> bytes:
    """The log record of an Invoke made by `invoke_body`."""
    return schemas.encode("log_record", {"body": ("oncely.Invoke", body)})
