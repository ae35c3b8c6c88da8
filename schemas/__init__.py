"""oncely's internal records (the log, the changelog, local checkpoints):
their schemas and their encoding.

These records are read and written only by oncely, on the hot path, so they
are MessagePack maps (msgspec): a format byte, then the record's fields by
name. Decoding checks every field against the typed schema below, so a
malformed record raises SchemaError instead of reaching the engine. Encoding
does not check (that would cost as much as a decode); every record kind is
round-tripped in tests/test_units.py. User payloads (JSON, Avro, bytes) are
not encoded here.

Evolution: a reader ignores fields it does not know, so a field may be added
as `NotRequired` (readers use `.get`). Any other change (a field removed,
renamed or retyped) takes a new format byte, and readers keep decoding the
formats they can. A new log kind gets a new kind byte (an older processor
dead-letters it as undecodable). A `Reply` status may gain a value only for
an answer to a new request kind: replies are keyed by request id and a
reader decodes only the answers to its own requests, so an older reader
never meets it.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import msgspec

FORMAT_AVRO = 0x01  # oncely <= 0.1 before issue 13: Avro, no longer read
FORMAT = 0x02       # MessagePack maps checked against the schemas below
_FORMAT = bytes([FORMAT])


class SchemaError(ValueError):
    """Bytes that do not decode as the expected internal record."""


# -- the log (<app>.log): commands addressed to a key ---------------------------


class CallerRef(TypedDict):
    """Where the response of a call goes."""
    invocation_id: bytes
    partition: int
    journal_index: int


class Header(TypedDict):
    name: str
    value: bytes | None


class SourceRecord(TypedDict):
    """The user-topic record a subscription turned into an invocation."""
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: list[Header]


class ReplyTo(TypedDict):
    """Where an outside caller waits for an invocation's result (<app>.replies)."""
    request_id: bytes
    partition: int


class Invoke(TypedDict):
    """Start an invocation of service/handler on key (None: a stateless service)."""
    invocation_id: bytes
    service: str
    handler: str
    key: bytes | None
    payload: bytes
    payload_format: Literal["JSON", "BYTES"]
    idempotency_key: str | None
    idempotency_retention_ms: int | None
    caller: CallerRef | None
    source: SourceRecord | None
    subscription: str | None  # the handler's input is decoded by this subscription's decoder
    created_at_ms: NotRequired[int]  # when the Invoke was made: end-to-end latency without a source record
    traceparent: NotRequired[str]  # W3C trace context of whoever made it (observe.tracing)
    reply: NotRequired[ReplyTo]  # an HTTP/Client call waiting for the result (gateway/)


class Response(TypedDict):
    """The outcome of a call, delivered to the caller's partition."""
    invocation_id: bytes  # the caller
    journal_index: int
    value: bytes | None
    failure: str | None


class AwakeableResult(TypedDict):
    """Completes an awakeable of a waiting invocation."""
    invocation_id: bytes
    journal_index: int
    value: bytes | None
    failure: str | None
    request_id: bytes | None  # the resolver's request: answered on <app>.replies under this key


class Attach(TypedDict):
    """An outside request for an invocation's outcome (gateway/): answered on
    <app>.replies now when it is finished (or unknown), else when it finishes
    (`wait`) or at once with its phase (not `wait`)."""
    invocation_id: bytes
    reply: ReplyTo
    wait: bool


class ReadState(TypedDict):
    """An outside read of a key's committed state (one name, or all: None),
    answered on <app>.replies in log order."""
    service: str
    key: bytes
    name: str | None
    reply: ReplyTo


class Delay(TypedDict):
    """A one-way send from outside that starts at `at_ms`: a durable timer
    on this partition produces `record` (an encoded Invoke) then."""
    at_ms: int
    invocation_id: bytes
    partition: int
    routing_key: bytes
    record: bytes


class Control(TypedDict):
    """An operator's command for one invocation (`oncely invocations`, the
    admin API), applied by its partition in its transaction
    (processor/controls.py); answered on <app>.replies when `reply` is set."""
    invocation_id: bytes
    action: Literal["cancel", "kill", "pause", "resume", "purge"]
    reply: ReplyTo | None


class Query(TypedDict):
    """An outside read of invocation status, answered on <app>.replies in
    log order: one invocation (`invocation_id`) or up to `limit` of this
    partition's, optionally only those in `phases`."""
    invocation_id: bytes | None
    phases: list[str]
    limit: int
    reply: ReplyTo


class Mark(TypedDict):
    """A log partition's marker to itself (processor/local_start.py): when
    the process that wrote it reads it back, everything older on that log
    partition has been read. Every other reader ignores it."""
    token: bytes  # the writing process's random token
    epoch: int    # its assignment epoch when written: markers of older epochs are ignored


class Reply(TypedDict):
    """A partition's answer on <app>.replies to a call, Attach, ReadState,
    Control or Query (keyed by its request id). status: completed (value),
    failed (error), running, unknown, state (entries: name -> tagged value);
    for a Control applied or conflict (error: why not); for a Query info
    (value: JSON list of invocation descriptions)."""
    invocation_id: bytes | None
    status: Literal["completed", "failed", "running", "unknown", "state", "applied", "conflict", "info"]
    value: bytes | None
    error: str | None
    entries: dict[str, bytes] | None


# -- the changelog (and the local store) -----------------------------------------


class InvocationStatus(TypedDict):
    """An invocation that outlives a commit (in flight, or retained after failure)."""
    invoke: Invoke
    phase: Literal["INBOXED", "RUNNING", "BACKING_OFF", "SUSPENDED", "PAUSED", "FAILED"]
    seq: int  # log offset of the Invoke: FIFO order per key (a local start: the read position)
    attempt: int
    retry_at_ms: int
    error: str | None
    held: NotRequired[bool]       # paused by an operator: stays PAUSED across restarts until resumed
    cancelled: NotRequired[bool]  # cancelled while awaiting nothing: its next await fails with "cancelled"
    expires_at_ms: NotRequired[int]  # FAILED (retained): when its retention ends (purge removes the expiry)
    # The remote deployment (dp_…) whose answer it first applied: retries,
    # resumptions and restarts go there again (remote/deployments.py).
    deployment: NotRequired[str]


class JournalEntry(TypedDict):
    """One ctx operation of an invocation; the store key holds (invocation id, index)."""
    kind: str
    name: str
    completed: bool
    value: bytes | None
    error: str | None
    partition: NotRequired[int]  # a call: the callee's log partition (a cancel or kill reaches it there)


class DedupEntry(TypedDict):
    """A finished invocation remembered for deduplication until it expires."""
    expires_at_ms: int
    failed: bool
    result: bytes | None
    error: str | None


class TimerRecord(TypedDict):
    """A durable timer; the store key holds (fire time, invocation id, journal index)."""
    kind: Literal["WAKE", "SEND"]
    partition: int              # SEND: the log partition of the record (WAKE: -1)
    routing_key: bytes | None
    record: bytes | None        # SEND: the encoded log record to produce


class Checkpoint(TypedDict):
    """Local only: the changelog offset a partition's RocksDB reflects (next offset to read)."""
    app: str
    partitions: int
    partition: int
    changelog_offset: int
    written_at_ms: int


# -- <app>.deployments (compacted, key = deployment id) ---------------------------


class DeploymentRecord(TypedDict):
    """A registered remote deployment (remote/deployments.py); a tombstone
    under its id removes it. `manifest` is the endpoint's discovery answer
    as it came (JSON), checked again by every reader."""
    id: str
    uri: str
    manifest: bytes
    headers: dict[str, str]  # extra request headers (e.g. a gateway's API key)
    registered_at_ms: int


# A log record is one byte of kind after the format byte, then its body.
LOG_KINDS: dict[str, tuple[int, type]] = {
    "oncely.Invoke": (1, Invoke),
    "oncely.Response": (2, Response),
    "oncely.AwakeableResult": (3, AwakeableResult),
    "oncely.Attach": (4, Attach),
    "oncely.ReadState": (5, ReadState),
    "oncely.Delay": (6, Delay),
    "oncely.Control": (7, Control),
    "oncely.Query": (8, Query),
    "oncely.Mark": (9, Mark),
}
RECORDS: dict[str, type] = {
    "invocation_status": InvocationStatus,
    "journal_entry": JournalEntry,
    "dedup_entry": DedupEntry,
    "timer": TimerRecord,
    "checkpoint": Checkpoint,
    "reply": Reply,
    "deployment": DeploymentRecord,
}

_encode = msgspec.msgpack.Encoder().encode
_decoders = {name: msgspec.msgpack.Decoder(t).decode for name, t in RECORDS.items()}
_kind_prefix = {kind: bytes([FORMAT, tag]) for kind, (tag, _) in LOG_KINDS.items()}
_kind_decoders = {tag: (kind, msgspec.msgpack.Decoder(t).decode) for kind, (tag, t) in LOG_KINDS.items()}


def encode(name: str, record: dict[str, Any]) -> bytes:
    """The stored form of an internal record; a log record is `{"body": (kind, body)}`."""
    try:
        if name == "log_record":
            kind, body = record["body"]
            return _kind_prefix[kind] + _encode(body)
        if name not in _decoders:
            raise KeyError(name)
        return _FORMAT + _encode(record)
    except KeyError as e:
        raise SchemaError(f"cannot encode {name}: unknown record or kind {e}") from None
    except (TypeError, ValueError) as e:
        raise SchemaError(f"cannot encode {name}: {e}") from None


def decode(name: str, data: bytes) -> dict[str, Any]:
    """The record's fields, checked against its schema; a log record as
    `{"body": (kind, body)}`. Raises SchemaError for anything else."""
    try:
        if data[0] == FORMAT:
            if name == "log_record":
                kind, dec = _kind_decoders[data[1]]
                return {"body": (kind, dec(data[2:]))}
            return _decoders[name](data[1:])
    except msgspec.MsgspecError as e:
        raise SchemaError(f"cannot decode {name}: {e}") from None
    except (KeyError, IndexError):
        if name != "log_record" and name not in _decoders:
            raise SchemaError(f"cannot decode {name}: no such internal record") from None
        if len(data) > 1:
            raise SchemaError(f"cannot decode log_record: unknown kind {data[1:2]!r} "
                              "(written by a newer oncely?)") from None
    raise SchemaError(_bad_format(name, data))


def _bad_format(name: str, data: bytes) -> str:
    if data[:1] == bytes([FORMAT_AVRO]):
        return (f"{name} record written by an older oncely (Avro, format byte 0x01), which this version no "
                "longer reads: stop the app, delete its state directory (<state_dir>/<app>) and its internal "
                "topics (<app>.log, <app>.changelog, <app>.replies), then start it again")
    return f"not an oncely {name} record (format byte {data[:1]!r}, expected {_FORMAT!r})"
