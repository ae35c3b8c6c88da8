"""Logging setup of every command (level, text or JSON lines), and
librdkafka's own log lines through Python logging, with repeats collapsed.

JSON lines carry, besides time, level, logger and message, every field a
log call passes as `extra` (an invocation's events pass `invocation_extra`:
invocation_id, target, event, reason), so a log pipeline can follow one
invocation without parsing messages.

Without a `logger` setting, librdkafka writes its lines straight to stderr:
while a broker is down that is hundreds of identical "Connection refused"
lines a minute, at whatever level the user chose. confluent-kafka hands a
client's lines to the object given as its `logger` setting (when the client
is polled); `KafkaLogRouter` is that object. It sends each line to the
`oncely.kafka` logger at the line's level, and lets one line of a kind (the
same text but for numbers) through per interval; the next one after the
interval says how many were held back.
"""

from __future__ import annotations

import logging
import re
import traceback
from datetime import datetime, timezone
import threading
import time
from typing import Any, Callable

import orjson

LOGGER_NAME = "oncely.kafka"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came as `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_NUMBERS = re.compile(r"\d+")
_SUPPRESSED = re.compile(r", \d+ identical error\(s\) suppressed")  # librdkafka's own collapsing


class KafkaLogRouter:
    """A confluent-kafka `logger`: librdkafka lines to Python logging, each
    kind of line at most once per `interval` seconds."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 1000) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self.interval = interval
        self._clock = clock
        self._max_kinds = max_kinds
        self._seen: dict[str, list[float]] = {}  # kind -> [time let through, lines held back since]
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: Any, **_: Any) -> None:
        """Called by librdkafka (through confluent-kafka) with a %-format."""
        if not self.logger.isEnabledFor(level):
            return
        text = msg % args if args else msg
        kind = _NUMBERS.sub("#", _SUPPRESSED.sub("", text))
        with self._lock:
            now = self._clock()
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self.interval:
                seen[1] += 1
                return
            held = int(seen[1]) if seen is not None else 0
            since = now - seen[0] if seen is not None else 0.0
            if seen is None and len(self._seen) >= self._max_kinds:
                self._seen.clear()
            self._seen[kind] = [now, 0]
        if held:
            text += f" (last message repeated {held} times in {since:.0f} s)"
        self.logger.log(level, "librdkafka %s", text)


_shared: KafkaLogRouter | None = None


def kafka_conf_logging() -> dict[str, Any]:
    """Entries to merge into a confluent-kafka client's config, so that its
    log lines go through Python logging (logger `oncely.kafka`, level chosen
    with --log-level) with repeats collapsed. One router per process, so the
    same line from several clients is collapsed too."""
    global _shared
    if _shared is None:
        _shared = KafkaLogRouter()
    return {"logger": _shared}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger,
    message, the record's `extra` fields, and `error` (the traceback) when
    an exception is attached."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_") and value is not None:
                out[name] = value
        if record.exc_info:
            out["error"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(out, default=str).decode()


def invocation_extra(inv: Any, event: str, reason: str | None = None) -> dict[str, Any]:
    """The `extra` of a log line about an invocation (`inv`: its `id` bytes
    and `target`): what the JSON format shows as fields."""
    from oncely.shuffle.ids import format_id

    return {"invocation_id": format_id(inv.id), "target": inv.target, "event": event, "reason": reason}


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger for a command: `level` is one of LEVELS,
    `fmt` one of FORMATS."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
