"""Encode + decode cost of oncely's internal records, per record kind: the
old format (Avro via fastavro, the `schemas/` package at a git revision,
default `main`) next to this tree's `oncely.schemas`, in one run.

For each kind it prints the best of several repeats (µs per record) of
`schemas.encode` and `schemas.decode`, the encoded size, and the ratio
old/new of encode + decode. The records are shaped like the engine's: a
subscription's Invoke (with its source record and a header), a Client's or
ctx.send's Invoke, a call's Response, an AwakeableResult, the in-flight
status written at each commit, a journal entry, a dedup entry, a delayed
send's timer and the local checkpoint.

A last section measures a typed alternative for the hottest paths, not
adopted: msgspec Structs of the same fields (same wire format) instead of
dicts, for decoding the log and encoding the in-flight status.

Usage: python bench/bench_encoding.py [--rev main] [--repeat 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any, Callable, Literal

import msgspec

from oncely import schemas

REPO = Path(__file__).resolve().parent.parent


def old_schemas(rev: str) -> Any:
    """The schemas package at `rev`, imported from a temporary copy."""
    out = Path(tempfile.mkdtemp(prefix="oncely-schemas-")) / "schemas"
    out.mkdir()
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", f"{rev}:schemas"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        blob = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:schemas/{name}"], check=True,
                              capture_output=True).stdout
        (out / name).write_bytes(blob)
    spec = importlib.util.spec_from_file_location("old_schemas", out / "__init__.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


ID, CALLER = b"\x17" * 16, b"\x2a" * 16
SUB_INVOKE = {"invocation_id": ID, "service": "totals", "handler": "add", "key": b"customer-0042",
              "payload": b'{"customer":"customer-0042","amount":12.5,"ts":1767225600123}',
              "payload_format": "BYTES", "idempotency_key": "deposits/3/123456", "idempotency_retention_ms": None,
              "caller": None, "source": {"topic": "deposits", "partition": 3, "offset": 123456,
                                         "timestamp_ms": 1767225600123, "key": b"customer-0042",
                                         "headers": [{"name": "Idempotency-Key", "value": b"dep-9912"}]},
              "subscription": "deposits"}
SEND_INVOKE = {**SUB_INVOKE, "payload": b'{"n":1}', "payload_format": "JSON", "idempotency_key": None,
               "source": None, "subscription": None,
               "caller": {"invocation_id": CALLER, "partition": 5, "journal_index": 3}}
# The old schema's extra fields (gone now: nothing read them).
OLD_INVOKE = {"created_at_ms": 1767225600125}
OLD_STATUS = {"result": None, "updated_at_ms": 1767225600200, "expires_at_ms": 0}
OLD_RESPONSE = {"callee_id": ID}

# (label, record name, new record, extra fields of the old one, or (old body extras) for log records)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("Invoke (subscription)", "log_record", {"body": ("oncely.Invoke", SUB_INVOKE)}, OLD_INVOKE),
    ("Invoke (send/call)", "log_record", {"body": ("oncely.Invoke", SEND_INVOKE)}, OLD_INVOKE),
    ("Response", "log_record", {"body": ("oncely.Response", {
        "invocation_id": CALLER, "journal_index": 3, "value": b'{"total":42}', "failure": None})}, OLD_RESPONSE),
    ("AwakeableResult", "log_record", {"body": ("oncely.AwakeableResult", {
        "invocation_id": ID, "journal_index": 1, "value": b'"ok"', "failure": None, "request_id": CALLER})}, {}),
    ("invocation_status", "invocation_status", {"invoke": SUB_INVOKE, "phase": "RUNNING", "seq": 98765,
                                                "attempt": 0, "retry_at_ms": 0, "error": None}, OLD_STATUS),
    ("journal_entry", "journal_entry", {"kind": "call", "name": "", "completed": True, "value": b'{"total":42}',
                                        "error": None}, {}),
    ("dedup_entry", "dedup_entry", {"expires_at_ms": 1767312000000, "failed": False, "result": b"null",
                                    "error": None}, {}),
    ("timer (SEND)", "timer", {"kind": "SEND", "partition": 2, "routing_key": b"customer-0042",
                               "record": b"\x01" + b"\x00" * 90}, {}),
    ("checkpoint", "checkpoint", {"app": "enrich", "partitions": 8, "partition": 3, "changelog_offset": 4567890,
                                  "written_at_ms": 1767225600000}, {}),
]


def old_form(name: str, record: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    if name == "log_record":
        kind, body = record["body"]
        return {"body": (kind, {**body, **extra})}
    if name == "invocation_status":
        return {**record, "invoke": {**record["invoke"], **OLD_INVOKE}, **extra}
    return {**record, **extra}


def best_us(fn: Callable[[], object], repeat: int) -> float:
    """Best of `repeat` timings, µs per call (each repeat ~50 ms)."""
    n, _ = timeit.Timer(fn).autorange()
    n = max(1, n // 4)
    return min(timeit.repeat(fn, number=n, repeat=repeat)) / n * 1e6


# -- the typed alternative (not adopted): Structs, same map wire format ---------


class CallerS(msgspec.Struct):
    invocation_id: bytes
    partition: int
    journal_index: int


class HeaderS(msgspec.Struct):
    name: str
    value: bytes | None


class SourceS(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: list[HeaderS]


class InvokeS(msgspec.Struct):
    invocation_id: bytes
    service: str
    handler: str
    key: bytes | None
    payload: bytes
    payload_format: Literal["JSON", "BYTES"]
    idempotency_key: str | None
    idempotency_retention_ms: int | None
    caller: CallerS | None
    source: SourceS | None
    subscription: str | None


class StatusS(msgspec.Struct):
    invoke: InvokeS
    phase: Literal["INBOXED", "RUNNING", "BACKING_OFF", "SUSPENDED", "PAUSED", "FAILED"]
    seq: int
    attempt: int
    retry_at_ms: int
    error: str | None


def struct_section(repeat: int) -> None:
    enc = msgspec.msgpack.Encoder().encode
    dec_invoke = msgspec.msgpack.Decoder(InvokeS).decode
    raw_log = schemas.encode("log_record", CASES[0][2])
    raw_status = schemas.encode("invocation_status", CASES[4][2])
    invoke_s = dec_invoke(memoryview(raw_log)[2:])
    status_s = msgspec.msgpack.Decoder(StatusS).decode(memoryview(raw_status)[1:])
    assert schemas.decode("invocation_status", b"\x02" + enc(status_s)) == CASES[4][2]  # same wire
    rows = [
        ("decode Invoke (subscription)", lambda: schemas.decode("log_record", raw_log),
         lambda: dec_invoke(memoryview(raw_log)[2:])),
        ("encode invocation_status", lambda: schemas.encode("invocation_status", CASES[4][2]),
         lambda: b"\x02" + enc(status_s)),
        ("encode Invoke (subscription)", lambda: schemas.encode("log_record", CASES[0][2]),
         lambda: b"\x02\x01" + enc(invoke_s)),
    ]
    print("\nTyped alternative (msgspec Structs, same bytes), µs per record:")
    print(f"{'':32s} {'dicts (adopted)':>16s} {'Structs':>8s}")
    for label, as_dict, as_struct in rows:
        print(f"{label:32s} {best_us(as_dict, repeat):16.2f} {best_us(as_struct, repeat):8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="main", help="git revision of the old schemas (default main)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    old = old_schemas(args.rev)
    if getattr(old, "FORMAT", None) == schemas.FORMAT:
        sys.exit(f"{args.rev} already has this encoding: give --rev a commit before it")
    print(f"old: schemas/ at {args.rev} (Avro, fastavro); new: {schemas.__file__} (msgspec MessagePack)")
    print(f"µs per record, best of {args.repeat}; ratio = old/new of encode + decode\n")
    print(f"{'record':22s} {'old enc':>8s} {'old dec':>8s} {'new enc':>8s} {'new dec':>8s} "
          f"{'old B':>6s} {'new B':>6s} {'ratio':>6s}")
    tot_old = tot_new = 0.0
    for label, name, record, extra in CASES:
        rec_old = old_form(name, record, extra)
        raw_old, raw_new = old.encode(name, rec_old), schemas.encode(name, record)
        assert schemas.decode(name, raw_new) == record
        oe = best_us(lambda: old.encode(name, rec_old), args.repeat)
        od = best_us(lambda: old.decode(name, raw_old), args.repeat)
        ne = best_us(lambda: schemas.encode(name, record), args.repeat)
        nd = best_us(lambda: schemas.decode(name, raw_new), args.repeat)
        tot_old += oe + od
        tot_new += ne + nd
        print(f"{label:22s} {oe:8.2f} {od:8.2f} {ne:8.2f} {nd:8.2f} {len(raw_old):6d} {len(raw_new):6d} "
              f"{(oe + od) / (ne + nd):5.0f}×")
    print(f"{'all kinds (sum)':22s} {'':35s} {'':13s} {tot_old / tot_new:5.0f}×")
    struct_section(args.repeat)


if __name__ == "__main__":
    main()
