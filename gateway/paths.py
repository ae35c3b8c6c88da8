"""What an HTTP request says, checked: path segments (percent-decoded to
bytes, so binary keys work), located invocation ids, Idempotency-Key,
`x-oncely-wait`, `delay`, bodies. Anything wrong raises HttpError with the
status and a message for the caller: user input never becomes a 500.
"""

from __future__ import annotations

import hmac
import re
from urllib.parse import unquote_to_bytes

import orjson

from oncely.sdk.protocol import TAG_BYTES, TAG_JSON
from oncely.shuffle.ids import format_id, parse_id

DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
MAX_IDEMPOTENCY_KEY = 256
MAX_DELAY_S = 365 * 24 * 3600
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_VISIBLE = re.compile(r"^[\x21-\x7e]+$")
_SHORT_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_ISO_DELAY = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class HttpError(Exception):
    """An answer other than success: status, message, optional headers and
    invocation id (JSON body `{"message": ..., "invocation_id"?: ...}`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 invocation_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.invocation_id = invocation_id


def segments(raw_path: str) -> list[bytes]:
    """The path's segments, each percent-decoded to bytes (the query is not
    part of it). An empty segment or a malformed escape is a 400."""
    path = raw_path.split("?", 1)[0].encode("latin-1", "replace")
    if not path.startswith(b"/"):
        raise HttpError(400, "the path must start with '/'")
    parts = path[1:].split(b"/")
    if parts and parts[-1] == b"" and len(parts) > 1:
        parts.pop()  # a trailing slash
    out = []
    for p in parts:
        if _BAD_ESCAPE.search(p):
            raise HttpError(400, f"malformed percent-encoding in path segment {p.decode('latin-1')!r}")
        out.append(unquote_to_bytes(p))
    if any(not p for p in out):
        raise HttpError(400, "empty path segment (a key must not be empty)")
    return out


def check_bearer(authorization: str, token: str) -> None:
    """401 unless the Authorization header carries `token` (constant-time)."""
    if not authorization.startswith("Bearer "):
        raise HttpError(401, "missing bearer token: send Authorization: Bearer <token>",
                        {"WWW-Authenticate": "Bearer"})
    given = authorization[7:].strip().encode("utf-8", "surrogateescape")  # aiohttp keeps odd bytes as surrogates
    if not hmac.compare_digest(given, token.encode()):
        raise HttpError(401, "wrong bearer token", {"WWW-Authenticate": "Bearer"})


def text(seg: bytes, what: str) -> str:
    """A name segment (service, handler, state name): UTF-8 text."""
    try:
        return seg.decode()
    except UnicodeDecodeError:
        raise HttpError(400, f"the {what} in the path is not UTF-8 text") from None


def located_id(inv_id: bytes, partition: int) -> str:
    """An invocation id that says its log partition: `inv_<id>_<partition>`."""
    return f"{format_id(inv_id)}_{partition}"


def parse_located(seg: bytes, partitions: int) -> tuple[bytes, int | None]:
    """(id, partition) of `inv_<id>_<partition>`, or (id, None) for a plain
    `inv_<id>` (its partition is found by asking every one)."""
    s = text(seg, "invocation id")
    base, sep, part = s.rpartition("_")
    located = bool(sep) and part.isdigit() and base.startswith("inv_")
    try:
        inv_id = parse_id(base if located else s)
    except ValueError as e:
        raise HttpError(400, str(e)) from None
    if not located:
        return inv_id, None
    p = int(part)
    if p >= partitions:
        raise HttpError(404, f"invocation {s}: the app has no log partition {p}")
    return inv_id, p


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not value or len(value.encode("utf-8", "replace")) > MAX_IDEMPOTENCY_KEY:
        raise HttpError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes long")
    if not _VISIBLE.match(value):
        raise HttpError(400, "Idempotency-Key must be visible ASCII (no spaces or control characters)")
    return value


def wait_seconds(value: str | None) -> float:
    if value is None:
        return DEFAULT_WAIT
    try:
        w = float(value)
    except ValueError:
        raise HttpError(400, f"x-oncely-wait {value!r} is not a number of seconds") from None
    if not 0 <= w <= MAX_WAIT:
        raise HttpError(400, f"x-oncely-wait must be between 0 and {MAX_WAIT:g} seconds")
    return w


def delay_seconds(value: str) -> float:
    """`10s`, `250ms`, `5m`, `2h`, `1d` or ISO 8601 (`PT10S`, `P1DT2H`)."""
    v = value.strip()
    m = _SHORT_DELAY.match(v)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        m = _ISO_DELAY.match(v.upper())
        if not m or v.upper() in ("P", "PT") or v.upper().endswith("T"):
            raise HttpError(400, f"delay {value!r}: expected e.g. 10s, 500ms, 5m, 2h, 1d or PT10S")
        d, h, mi, s = (float(x) if x else 0.0 for x in m.groups())
        seconds = d * 86400 + h * 3600 + mi * 60 + s
    if seconds > MAX_DELAY_S:
        raise HttpError(400, f"delay {value!r} is longer than 365 days")
    return seconds


def payload(body: bytes, content_type: str) -> tuple[bytes, str]:
    """A handler's input from a request body: (payload, payload_format)."""
    if content_type in ("", "application/json") or content_type.endswith("+json"):
        if not body.strip():
            return b"null", "JSON"
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"the body is not valid JSON: {e}") from None
        return body, "JSON"
    if content_type == "application/octet-stream":
        return body, "BYTES"
    raise HttpError(415, f"content type {content_type!r} is not supported: send application/json or "
                         "application/octet-stream")


def tagged_value(body: bytes, content_type: str) -> bytes:
    """A value as the engine stores it (awakeable results): JSON or bytes."""
    data, fmt = payload(body, content_type)
    return (TAG_JSON if fmt == "JSON" else TAG_BYTES) + data
