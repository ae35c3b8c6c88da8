"""Sinks: user topics that handlers emit to, and how values become bytes.

A record is serialized completely when `ctx.emit` is called, so a value that
does not fit its format fails the handler there (retried, then dead-lettered)
and never reaches Kafka half-made. Emitted records are buffered with the
invocation and produced in the transaction that completes it: an invocation
that fails emits nothing.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fastavro
import fastavro.validation
import orjson

from oncely.errors import ConfigError, RecordTooLarge
from oncely.sdk.protocol import CLIENT_MAX_BYTES, RECORD_OVERHEAD
from oncely.shuffle.targets import key_bytes

Headers = list[tuple[str, bytes]]


class Serializer:
    name = "?"
    # `serialize` when that is one C call (JSON) whose TypeError `serialize`
    # turns into the ValueError that says why: `Sinks.record` calls it directly.
    dumps: Callable[[Any], bytes] | None = None

    def serialize(self, value: Any) -> bytes:
        raise NotImplementedError


class JsonSerializer(Serializer):
    name = "json"
    dumps = staticmethod(orjson.dumps)

    def serialize(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError as e:
            raise ValueError(f"the value is not JSON-serialisable: {e}") from None


class BytesSerializer(Serializer):
    name = "bytes"

    def serialize(self, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, str):
            return value.encode()
        raise ValueError(f"a 'bytes' sink takes bytes or str, not {type(value).__name__}")


class AvroSerializer(Serializer):
    """Schemaless Avro datums of one schema (no Schema Registry framing)."""

    def __init__(self, path: str) -> None:
        self.name = f"avro:{path}"
        self.path = path
        try:
            self.schema = fastavro.parse_schema(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"sink value='avro:{path}': no such schema file") from None
        except (ValueError, fastavro.schema.SchemaParseException) as e:
            raise ConfigError(f"sink value='avro:{path}': not a valid Avro schema: {e}") from None

    def serialize(self, value: Any) -> bytes:
        try:
            fastavro.validation.validate(value, self.schema, raise_errors=True)
        except fastavro.validation.ValidationError as e:
            raise ValueError(f"the value does not fit the Avro schema {self.path}: {e}") from None
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.schema, value)
        return buf.getvalue()


def make_serializer(value: str | Serializer) -> Serializer:
    if isinstance(value, Serializer):
        return value
    if value == "json":
        return JsonSerializer()
    if value == "bytes":
        return BytesSerializer()
    if isinstance(value, str) and value.startswith("avro:"):
        return AvroSerializer(value[5:])
    raise ConfigError(f"sink value={value!r}: use 'json', 'bytes' or 'avro:<path to .avsc>'")


def record_key(key: Any) -> bytes | None:
    """Emitted record keys: as log keys (bytes, str, int), else JSON."""
    try:
        return key_bytes(key)
    except TypeError:
        pass
    try:
        return orjson.dumps(key)
    except TypeError:
        raise ValueError(f"an emitted key must be str, bytes, int or JSON, not {type(key).__name__}") from None


def headers_of(headers: Any) -> Headers | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    out: Headers = []
    for k, v in items:
        if not isinstance(k, str):
            raise ValueError("header names must be str")
        out.append((k, v.encode() if isinstance(v, str) else bytes(v)))
    return out


@dataclass
class Sink:
    topic: str
    serializer: Serializer
    partitions: int | None = None


class Sinks:
    """The app's declared sinks, plus undeclared topics (JSON) that exist."""

    def __init__(self, declared: dict[str, Sink], topic_exists: Callable[[str], bool] | None = None) -> None:
        self.declared = declared
        self._json = JsonSerializer()
        self._topic_exists = topic_exists
        self._known: set[str] = set(declared)
        # max.message.bytes per topic (read at start) and the client's own.
        self.topic_max: dict[str, int] = {}
        self.client_max = CLIENT_MAX_BYTES
        self._missing_until: dict[str, float] = {}

    def record(self, topic: str, value: Any, key: Any, headers: Any) -> tuple[str, bytes | None, bytes, Headers | None]:
        """The complete record to produce, or ValueError saying why not."""
        sink = self.declared.get(topic)
        if sink is None:
            self._require(topic)
            serializer: Serializer = self._json
        else:
            serializer = sink.serializer
        if serializer.dumps is not None:
            try:
                data = serializer.dumps(value)
            except TypeError:
                data = serializer.serialize(value)  # (raises what says why)
        else:
            data = serializer.serialize(value)
        limit = min(self.client_max, self.topic_max.get(topic, self.client_max)) - RECORD_OVERHEAD
        if len(data) > limit:
            raise RecordTooLarge(f"ctx.emit({topic!r}): the value", len(data), limit, topic)
        kt = type(key)  # the common keys without a call: bytes, str, None
        kb = key if kt is bytes or key is None else key.encode() if kt is str else record_key(key)
        return topic, kb, data, headers_of(headers) if headers else None

    def _require(self, topic: str) -> None:
        if topic in self._known:
            return
        if self._missing_until.get(topic, 0) > time.monotonic():
            raise ValueError(f"emit to topic {topic!r}, which does not exist (declare it with app.sink)")
        if self._topic_exists is None or not self._topic_exists(topic):
            self._missing_until[topic] = time.monotonic() + 5.0
            raise ValueError(f"emit to topic {topic!r}, which does not exist (declare it with app.sink)")
        self._known.add(topic)
