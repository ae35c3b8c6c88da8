"""Avro schemas of oncely's internal records, loaded with fastavro.

Every encoded value starts with a format byte so that a later schema change
can be told apart from today's records instead of mis-decoding them.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro

FORMAT_V1 = b"\x01"
_DIR = Path(__file__).parent
# Files in dependency order: later ones refer to names defined earlier.
_FILES = ("log_record", "invocation_status", "journal_entry", "dedup_entry", "checkpoint", "timer")


class SchemaError(ValueError):
    """Bytes that do not decode as the expected internal record."""


@lru_cache(maxsize=None)
def _all() -> dict[str, Any]:
    named: dict[str, Any] = {}
    parsed = {}
    for name in _FILES:
        raw = json.loads((_DIR / f"{name}.avsc").read_text())
        parsed[name] = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


def schema(name: str) -> Any:
    return _all()[name]


def encode(name: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(FORMAT_V1)
    fastavro.schemaless_writer(buf, _all()[name], record)
    return buf.getvalue()


def decode(name: str, data: bytes) -> dict[str, Any]:
    if not data or data[:1] != FORMAT_V1:
        raise SchemaError(f"not an oncely v1 {name} record (first byte {data[:1]!r})")
    try:
        return fastavro.schemaless_reader(io.BytesIO(data[1:]), _all()[name], return_record_name=True,
                                          return_record_name_override=True)
    except Exception as e:
        raise SchemaError(f"cannot decode {name}: {e}") from None
