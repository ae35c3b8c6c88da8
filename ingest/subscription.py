"""Subscriptions: which source topics feed which handler, and how a source
record is decoded, keyed and deduplicated."""

from __future__ import annotations

import base64
import functools
import io
import re
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import fastavro
import orjson

from oncely.errors import ConfigError

if TYPE_CHECKING:
    from oncely.app import Handler

DEFAULT_RETENTION = timedelta(hours=24)
# An Invoke must fit the log topic's max.message.bytes (1 MiB by default)
# with its envelope, or it would make every transaction fail.
DEFAULT_MAX_BYTES = 900 * 1024


@dataclass(frozen=True)
class SourceRecord:
    """A source record as key and idempotency functions (and `ctx.record`) see it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    value: Any = None  # the decoded value (None in ctx.record: the handler gets it as its input)

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=timezone.utc)

    def header(self, name: str) -> bytes | None:
        """The last header named `name` (Kafka allows repeats), or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found


class Decoder:
    """Turns a record value into what the handler receives."""

    name: str = "?"
    payload_format: str = "BYTES"   # how the Invoke carries the raw value
    reencode: bool = False          # the executor must decode the raw value again
    # `decode` of a non-null value when that is one C call (JSON): the route
    # calls it directly, a Python call less per record.
    loads: Callable[[bytes], Any] | None = None

    def decode(self, raw: bytes | None) -> Any:
        raise NotImplementedError


class JsonDecoder(Decoder):
    name = "json"
    payload_format = "JSON"
    loads = staticmethod(orjson.loads)

    def decode(self, raw: bytes | None) -> Any:
        if raw is None:
            raise ValueError("the record has no value (null), not JSON")
        return orjson.loads(raw)


class BytesDecoder(Decoder):
    name = "bytes"

    def decode(self, raw: bytes | None) -> Any:
        if raw is None:
            raise ValueError("the record has no value (null)")
        return raw


class AvroDecoder(Decoder):
    """A schemaless Avro datum written with the given schema (no container,
    no Schema Registry header)."""

    reencode = True

    def __init__(self, path: str) -> None:
        self.name = f"avro:{path}"
        try:
            self.schema = fastavro.parse_schema(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"value='avro:{path}': no such schema file") from None
        except (ValueError, fastavro.schema.SchemaParseException) as e:
            raise ConfigError(f"value='avro:{path}': not a valid Avro schema: {e}") from None

    def decode(self, raw: bytes | None) -> Any:
        if raw is None:
            raise ValueError("the record has no value (null), not Avro")
        buf = io.BytesIO(raw)
        try:
            value = fastavro.schemaless_reader(buf, self.schema, None)
        except Exception as e:
            raise ValueError(f"not an Avro datum of {self.name[5:]}: {type(e).__name__}: {e}") from None
        if buf.tell() != len(raw):
            raise ValueError(f"not an Avro datum of {self.name[5:]}: {len(raw) - buf.tell()} bytes left over")
        return value


class CallableDecoder(Decoder):
    reencode = True

    def __init__(self, fn: Callable[[bytes | None], Any]) -> None:
        self.fn = fn
        self.name = f"callable:{getattr(fn, '__qualname__', repr(fn))}"

    def decode(self, raw: bytes | None) -> Any:
        return self.fn(raw)


def make_decoder(value: str | Callable[[bytes | None], Any]) -> Decoder:
    if callable(value):
        return CallableDecoder(value)
    if value == "json":
        return JsonDecoder()
    if value == "bytes":
        return BytesDecoder()
    if isinstance(value, str) and value.startswith("avro:"):
        return AvroDecoder(value[5:])
    raise ConfigError(f"value={value!r}: use 'json', 'bytes', 'avro:<path to .avsc>' or a callable")


IdempotencyFn = Callable[[SourceRecord], "str | bytes | None"]


def make_idempotency(spec: str | IdempotencyFn | None) -> IdempotencyFn | None:
    if spec is None:
        return None
    if callable(spec):
        return spec
    if isinstance(spec, str) and spec.startswith("header:") and len(spec) > 7:
        name = spec[7:]
        return lambda rec: rec.header(name)
    raise ConfigError(f"idempotency={spec!r}: use 'header:<name>', a callable on the record, or None")


def idempotency_text(value: str | bytes) -> str:
    """Idempotency keys travel as text: UTF-8 as is, other bytes in base64."""
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(value).decode()


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class HandlerRef:
    """A subscription's target named `"service/handler"`: a handler a
    deployment's endpoint runs, known only once the processor discovered
    its deployments (`check()` at start); until then `service` raises."""

    def __init__(self, app: Any, service: str, name: str) -> None:
        self.app = app
        self.service_name = service
        self.name = name

    @property
    def service(self) -> Any:
        svc = self.app.services.get(self.service_name)
        if svc is None or self.name not in svc.handlers:
            raise ConfigError(f"subscription target {self.service_name}/{self.name}: no deployment of app "
                              f"{self.app.name!r} has this handler")
        return svc

    @classmethod
    def named(cls, app: Any, target: str) -> HandlerRef:
        svc, _, handler = target.partition("/")
        if not (_NAME.match(svc) and _NAME.match(handler)):
            raise ConfigError(f"subscribe: target {target!r}: name a remote handler as 'service/handler'")
        return cls(app, svc, handler)

    def check(self) -> None:
        self.service  # noqa: B018  raises ConfigError when unknown

    def __repr__(self) -> str:
        return f"<handler {self.service_name}/{self.name} (remote)>"


@dataclass
class Subscription:
    name: str
    topics: tuple[str, ...]
    target: "Handler"
    decoder: Decoder
    key: Callable[[SourceRecord], Any] | None
    idempotency: IdempotencyFn | None
    retention: timedelta = DEFAULT_RETENTION
    max_bytes: int = DEFAULT_MAX_BYTES
    # invoked: Invokes made (local: of which taken on this process without the log: started, or waiting
    # for their key, which the commit may yet send to the log; processor/local_waits.py)
    stats: dict[str, int] = field(default_factory=lambda: {"read": 0, "invoked": 0, "local": 0, "dead": 0})

    @property
    def keyed(self) -> bool:
        return self.target.service.keyed

    @functools.cached_property
    def retention_ms(self) -> int:
        """How long a finished record is remembered (its dedup entry, or its
        retained failure); made once, read for every record."""
        return int(self.retention.total_seconds() * 1000)

    @functools.cached_property
    def invoke_fields(self) -> tuple[str, str, bool, str, str, str | None]:
        """What every Invoke of this subscription has in common: service,
        handler, keyed, "service/handler" (in source-record ids), payload
        format, and the subscription's name when the executor decodes the
        raw value again. Made once, read for every record."""
        service = self.target.service
        return (service.name, self.target.name, service.keyed, f"{service.name}/{self.target.name}",
                self.decoder.payload_format, self.name if self.decoder.reencode else None)
