"""Wire protocol v1 between a processor and a remote endpoint.

One POST carries a batch of invocations; every value travels as the exact
bytes the processor stores (tag + JSON, or raw), base64-encoded in a JSON
(orjson) body, so neither side re-encodes a user value. The endpoint parses
requests here (`parse_invoke`); the processor builds them (`item_request`).
Every field is checked: a request is untrusted input, and so, for the
processor, is a response (nothing is ever unpickled).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from oncely.sdk.protocol import CLIENT_MAX_BYTES, Entry, Limits
from oncely.shuffle.ids import format_id, parse_id

if TYPE_CHECKING:
    import aiohttp

PROTOCOL_MIN = 1
PROTOCOL_MAX = 1
INVOKE_MEDIA_TYPE = "application/vnd.oncely.invoke.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oncely.manifest.v1+json"
MEDIA_PREFIX = "application/vnd.oncely.invoke."

DEFAULT_DEADLINE_MS = 10_000
MAX_DEADLINE_MS = 15 * 60 * 1000
MAX_JOURNAL = 100_000
MAX_NAME = 1024
_APP_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")

# Statuses an item answers with, and what each carries beyond entries.
STATUSES = ("completed", "suspended", "yield", "need_state", "retry", "terminal", "paused", "unknown_handler")
PAYLOAD_FORMATS = ("JSON", "BYTES")


class Malformed(ValueError):
    """The request does not follow the protocol (a 400)."""


class BatchTooLarge(Malformed):
    """More items than the endpoint's max_batch (a 413: split the batch)."""


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise Malformed(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{what} is not valid base64") from None


def _opt_b64(value: Any, what: str) -> bytes | None:
    return None if value is None else unb64(value, what)


def _field(obj: Any, name: str, kind: type | tuple[type, ...], what: str, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise Malformed(f"{what} must be an object")
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"{what}.{name} is missing or of the wrong type")
    return value


def _name(obj: Any, name: str, what: str, optional: bool = False) -> Any:
    value = _field(obj, name, str, what, optional)
    if value is not None and len(value) > MAX_NAME:
        raise Malformed(f"{what}.{name} is longer than {MAX_NAME} characters")
    return value


@dataclass(slots=True)
class StateSnapshot:
    """A key's committed state as the processor sent it: every value when
    `complete`, else a part of them (and the names when known)."""

    complete: bool
    values: dict[str, bytes]
    names: list[str] | None


@dataclass(slots=True)
class ItemRequest:
    invocation_id: bytes
    service: str
    handler: str
    key: bytes | None
    payload: bytes
    payload_format: str
    attempt: int
    source: dict[str, Any] | None
    journal: list[Entry]
    state: StateSnapshot | None


@dataclass(slots=True)
class InvokeRequest:
    app: str
    partition: int
    deadline_ms: int | None
    limits: Limits
    items: list[ItemRequest]


def parse_invoke(body: bytes, max_batch: int) -> InvokeRequest:
    """The request body, checked field by field (Malformed says what is wrong)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Malformed(f"the body is not JSON: {e}") from None
    app = _name(doc, "app", "request")
    if not _APP_NAME.match(app) or len(app) > 200:
        raise Malformed("request.app is not a valid app name")
    partition = _field(doc, "partition", int, "request")
    deadline = _field(doc, "deadline_ms", int, "request", optional=True)
    if partition < 0 or partition > 0xFFFF:
        raise Malformed("request.partition is out of range")
    if deadline is not None and deadline <= 0:
        raise Malformed("request.deadline_ms must be positive")
    limits = _limits(doc.get("limits"))
    items = _field(doc, "items", list, "request")
    if len(items) > max_batch:
        raise BatchTooLarge(f"request.items holds {len(items)} items; this endpoint takes at most {max_batch}")
    parsed = [_item(it, i) for i, it in enumerate(items)]
    if len({it.invocation_id for it in parsed}) != len(parsed):
        raise Malformed("request.items names one invocation twice")
    return InvokeRequest(app, partition, deadline, limits, parsed)


def _limits(raw: Any) -> Limits:
    if raw is None:
        return Limits()
    state = _field(raw, "state", int, "request.limits")
    message = _field(raw, "message", int, "request.limits")
    if not (0 < state <= 64 * CLIENT_MAX_BYTES and 0 < message <= 64 * CLIENT_MAX_BYTES):
        raise Malformed("request.limits are out of range")
    return Limits(state=state, message=message)


def _item(raw: Any, i: int) -> ItemRequest:
    what = f"items[{i}]"
    text_id = _name(raw, "id", what)
    try:
        inv_id = parse_id(text_id)
    except ValueError as e:
        raise Malformed(f"{what}.id: {e}") from None
    inp = _field(raw, "input", dict, what)
    fmt = _field(inp, "format", str, f"{what}.input")
    if fmt not in PAYLOAD_FORMATS:
        raise Malformed(f"{what}.input.format must be one of {', '.join(PAYLOAD_FORMATS)}")
    attempt = _field(raw, "attempt", int, what)
    if attempt < 0:
        raise Malformed(f"{what}.attempt must not be negative")
    journal = _field(raw, "journal", list, what)
    if len(journal) > MAX_JOURNAL:
        raise Malformed(f"{what}.journal is longer than {MAX_JOURNAL} entries")
    return ItemRequest(
        inv_id, _name(raw, "service", what), _name(raw, "handler", what),
        _opt_b64(raw.get("key"), f"{what}.key"), unb64(inp.get("data"), f"{what}.input.data"), fmt, attempt,
        _source(raw.get("source"), f"{what}.source"),
        [_entry(e, f"{what}.journal[{j}]") for j, e in enumerate(journal)],
        _state(raw.get("state"), f"{what}.state"))


def _entry(raw: Any, what: str) -> Entry:
    kind = _name(raw, "kind", what)
    name = _field(raw, "name", str, what)
    completed = _field(raw, "completed", bool, what)
    error = _field(raw, "error", str, what, optional=True)
    return Entry(kind, name, _opt_b64(raw.get("value"), f"{what}.value"), error, completed)


def _source(raw: Any, what: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    headers = _field(raw, "headers", list, what)
    return {
        "topic": _name(raw, "topic", what), "partition": _field(raw, "partition", int, what),
        "offset": _field(raw, "offset", int, what), "timestamp_ms": _field(raw, "timestamp_ms", int, what),
        "key": _opt_b64(raw.get("key"), f"{what}.key"),
        "headers": [{"name": _name(h, "name", f"{what}.headers[{j}]"),
                     "value": unb64(h.get("value"), f"{what}.headers[{j}].value")} for j, h in enumerate(headers)],
    }


def _state(raw: Any, what: str) -> StateSnapshot | None:
    if raw is None:
        return None
    complete = _field(raw, "complete", bool, what)
    values = _field(raw, "values", dict, what)
    names = _field(raw, "names", list, what, optional=True)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise Malformed(f"{what}.names must be strings")
    return StateSnapshot(complete, {str(n): unb64(v, f"{what}.values[{n!r}]") for n, v in values.items()},
                         names)


# -- the processor's side: building requests ---------------------------------------


def entry_json(e: Entry) -> dict[str, Any]:
    return {"kind": e.kind, "name": e.name, "completed": e.completed, "value": b64(e.value), "error": e.error}


def item_request(invocation_id: bytes, service: str, handler: str, key: bytes | None, payload: bytes,
                 payload_format: str, attempt: int, journal: list[Entry], *,
                 state: StateSnapshot | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """One `items[]` element (the processor's side of `parse_invoke`)."""
    src = None if source is None else {
        **source, "key": b64(source["key"]),
        "headers": [{"name": h["name"], "value": b64(h["value"])} for h in source["headers"]]}
    st = None if state is None else {"complete": state.complete, "names": state.names,
                                     "values": {n: b64(v) for n, v in state.values.items()}}
    return {"id": format_id(invocation_id), "service": service, "handler": handler, "key": b64(key),
            "input": {"format": payload_format, "data": b64(payload)}, "attempt": attempt, "source": src,
            "journal": [entry_json(e) for e in journal], "state": st}


def invoke_request(app: str, partition: int, items: list[dict[str, Any]], deadline_ms: int | None = None,
                   limits: Limits | None = None) -> bytes:
    """The body of `POST …/invoke`."""
    doc: dict[str, Any] = {"app": app, "partition": partition, "items": items}
    if deadline_ms is not None:
        doc["deadline_ms"] = deadline_ms
    if limits is not None:
        doc["limits"] = {"state": limits.state, "message": limits.message}
    return orjson.dumps(doc)


async def read_capped(resp: "aiohttp.ClientResponse", cap: int) -> bytes:
    """The whole body, or its first `cap` bytes and more (the caller refuses
    it). `content.read(n)` would return only what has arrived so far."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= cap:
            break
    return b"".join(chunks)
