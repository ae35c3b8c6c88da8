"""Dead-letter records for `<app>.dlq`.

The value is the original payload (so a fixed record can be re-fed as is);
the key is the original key; headers say why and where from. All header
values are UTF-8 text.
"""

from __future__ import annotations

import time
from typing import Any

from oncely.shuffle.ids import format_id

H_REASON = "oncely.reason"          # e.g. retries-exhausted, terminal, undecodable, unknown-handler
H_ERROR = "oncely.error"            # the error message
H_APP = "oncely.app"
H_INVOCATION = "oncely.invocation_id"
H_TARGET = "oncely.target"          # service/handler
H_ATTEMPTS = "oncely.attempts"
H_SOURCE_TOPIC = "oncely.source.topic"
H_SOURCE_PARTITION = "oncely.source.partition"
H_SOURCE_OFFSET = "oncely.source.offset"
H_TIME = "oncely.failed_at_ms"

H_TRUNCATED = "oncely.truncated_from"  # the payload's length, when it was cut to fit
MAX_ERROR_LEN = 8192
# A dead letter must always be producible (it is how a record that cannot be
# produced is reported): a larger payload is cut to this many bytes.
MAX_VALUE_LEN = 900_000


def dead_letter(
    app: str,
    reason: str,
    error: str,
    key: bytes | None,
    value: bytes | None,
    *,
    invocation_id: bytes | None = None,
    target: str | None = None,
    attempts: int | None = None,
    source: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
    """(key, value, headers) of a dead letter."""
    headers: dict[str, str] = {
        H_APP: app,
        H_REASON: reason,
        H_ERROR: error[:MAX_ERROR_LEN],
        H_TIME: str(int(time.time() * 1000)),
    }
    if invocation_id is not None:
        headers[H_INVOCATION] = format_id(invocation_id)
    if target is not None:
        headers[H_TARGET] = target
    if attempts is not None:
        headers[H_ATTEMPTS] = str(attempts)
    if source is not None:
        headers[H_SOURCE_TOPIC] = str(source["topic"])
        headers[H_SOURCE_PARTITION] = str(source["partition"])
        headers[H_SOURCE_OFFSET] = str(source["offset"])
    if extra:
        headers.update(extra)
    if value is not None and len(value) > MAX_VALUE_LEN:
        headers[H_TRUNCATED] = str(len(value))
        value = value[:MAX_VALUE_LEN]
    return key, value, [(k, v.encode()) for k, v in headers.items()]
