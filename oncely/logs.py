"""librdkafka's own log lines through Python logging, with repeats collapsed.

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
import threading
import time
from typing import Any, Callable

LOGGER_NAME = "oncely.kafka"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
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


def setup_logging(level: str) -> None:
    """Configure the root logger for a command; `level` is one of LEVELS."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
