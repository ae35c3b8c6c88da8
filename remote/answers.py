"""The processor's side of wire protocol v1: an endpoint's answer, checked.

A response is untrusted input. `parse_answers` checks it against what was
sent (one answer per item, in order, ids echoed, `known` equal to the
journal length sent), the kinds of the new entries, the op data of sends,
calls and sleeps (a callee id must be `child_id(caller, index)`, as the
processor computes it) and every status's fields. `BadAnswer` means the
endpoint broke the protocol: neither the handler nor a retry can fix that,
so the processor pauses the invocation (it does not burn an attempt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from oncely.remote.wire import STATUSES, Malformed, unb64
from oncely.sdk.protocol import Entry
from oncely.shuffle.ids import child_id, format_id

KINDS = frozenset(("get", "set", "clear", "clear_all", "state_keys", "run", "now", "random", "uuid", "emit",
                   "send", "call", "sleep", "awakeable"))
WITH_OP = frozenset(("send", "call", "sleep"))


class BadAnswer(ValueError):
    """The response does not follow the protocol."""


@dataclass(slots=True)
class Op:
    """What a new send, call or sleep entry asks the processor to do."""

    op: str
    service: str = ""
    handler: str = ""
    key: bytes | None = None
    payload: bytes = b""
    payload_format: str = "JSON"
    delay_ms: int | None = None
    duration_ms: int = 0


@dataclass(slots=True)
class Emit:
    topic: str
    key: bytes | None
    value: bytes
    format: str
    headers: list[tuple[str, bytes]] | None


@dataclass(slots=True)
class Answer:
    invocation_id: bytes
    known: int
    entries: list[Entry]
    ops: dict[int, Op]
    status: str
    error: str | None = None
    output: bytes | None = None
    state_set: dict[str, bytes] = field(default_factory=dict)
    state_clear: list[str] = field(default_factory=list)
    clear_all: bool = False
    emits: list[Emit] = field(default_factory=list)
    awaiting: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    keys: bool = False


def _get(obj: Any, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = obj.get(name) if isinstance(obj, dict) else None
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadAnswer(f"{name} is missing or of the wrong type")
    return value


def _bytes(value: Any, what: str, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    try:
        return unb64(value, what)
    except Malformed as e:
        raise BadAnswer(str(e)) from None


def parse_answers(body: bytes, sent: list[tuple[bytes, int]]) -> list[Answer]:
    """The answers to a request whose items were `sent` as (invocation id,
    journal length), in order."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadAnswer(f"the response is not JSON: {e}") from None
    items = _get(doc, "items", list)
    if len(items) != len(sent):
        raise BadAnswer(f"{len(items)} answers to {len(sent)} items")
    return [_answer(raw, inv, known) for raw, (inv, known) in zip(items, sent)]


def _answer(raw: Any, inv: bytes, sent_len: int) -> Answer:
    if _get(raw, "id", str) != format_id(inv):
        raise BadAnswer(f"an answer for {raw.get('id')!r} where {format_id(inv)} was expected")
    if _get(raw, "known", int) != sent_len:
        raise BadAnswer(f"{format_id(inv)}: known {raw['known']} but {sent_len} entries were sent")
    status = _get(raw, "status", str)
    if status not in STATUSES:
        raise BadAnswer(f"{format_id(inv)}: unknown status {status!r}")
    entries: list[Entry] = []
    ops: dict[int, Op] = {}
    for i, e in enumerate(_get(raw, "entries", list), start=sent_len):
        kind = _get(e, "kind", str)
        if kind not in KINDS:
            raise BadAnswer(f"{format_id(inv)}: unknown entry kind {kind!r}")
        entry = Entry(kind, _get(e, "name", str), _bytes(e.get("value"), "value", True),
                      _get(e, "error", str, True), _get(e, "completed", bool))
        if kind in WITH_OP:
            ops[i] = _op(_get(e, "op", dict), kind, inv, i, entry)
        entries.append(entry)
    a = Answer(inv, sent_len, entries, ops, status, _get(raw, "error", str, True))
    end = sent_len + len(entries)
    if status == "completed":
        a.output = _bytes(raw.get("output"), "output")
        st = _get(raw, "state", dict)
        a.state_set = {str(n): _bytes(v, f"state {n!r}") for n, v in _get(st, "set", dict).items()}
        a.state_clear = [n for n in _get(st, "clear", list) if isinstance(n, str)]
        a.clear_all = _get(st, "clear_all", bool)
        a.emits = [_emit(x) for x in _get(raw, "emits", list)]
    elif status == "suspended":
        a.awaiting = _get(raw, "awaiting", list)
        if not a.awaiting or not all(isinstance(i, int) and 0 <= i < end for i in a.awaiting):
            raise BadAnswer(f"{format_id(inv)}: awaiting {a.awaiting!r} names no entry of the journal")
    elif status == "need_state":
        a.names = [n for n in _get(raw, "names", list) if isinstance(n, str)]
        a.keys = _get(raw, "keys", bool)
    elif status in ("retry", "terminal", "paused", "unknown_handler") and a.error is None:
        raise BadAnswer(f"{format_id(inv)}: status {status} without an error")
    return a


def _op(raw: dict[str, Any], kind: str, inv: bytes, index: int, entry: Entry) -> Op:
    if _get(raw, "op", str) != kind:
        raise BadAnswer(f"entry {index} is a {kind} but its op is {raw.get('op')!r}")
    if kind == "sleep":
        duration = _get(raw, "duration_ms", int)
        if duration < 0:
            raise BadAnswer(f"entry {index}: a negative sleep")
        return Op("sleep", duration_ms=duration)
    if _get(raw, "callee", str) != format_id(child_id(inv, index)):
        raise BadAnswer(f"entry {index}: the callee id is not child_id(caller, {index})")
    if kind == "send" and entry.value != child_id(inv, index):
        raise BadAnswer(f"entry {index}: a send entry holds its callee id")
    inp = _get(raw, "input", dict)
    fmt = _get(inp, "format", str)
    if fmt not in ("JSON", "BYTES"):
        raise BadAnswer(f"entry {index}: input format {fmt!r}")
    delay = _get(raw, "delay_ms", int, True) if kind == "send" else None
    return Op(kind, _get(raw, "service", str), _get(raw, "handler", str), _bytes(raw.get("key"), "key", True),
              _bytes(inp.get("data"), "input"), fmt, delay)


def _emit(raw: Any) -> Emit:
    value = _get(raw, "value", dict)
    headers = _get(raw, "headers", list, True)
    return Emit(_get(raw, "topic", str), _bytes(raw.get("key"), "key", True), _bytes(value.get("data"), "value"),
                _get(value, "format", str),
                None if headers is None else [(_get(h, "name", str), _bytes(h.get("value"), "header"))
                                              for h in headers])
