"""oncely: a Kafka-native exactly-once event processor.

Durable keyed handlers whose journals and state live in a local RocksDB fed
by a changelog topic; one Kafka transaction per commit carries state changes,
produced records and consumer offsets.

`import oncely` loads neither librdkafka nor RocksDB: `Client` (and with it
confluent_kafka) is imported on first use, so an app module can be imported
where only its handlers run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncely.app import App, Handler, RetryPolicy, Service
from oncely.context import Context, DurableFuture, KeyedContext, gather
from oncely.errors import (AwakeableError, ConfigError, NonDeterminismError, OncelyError, RecordTooLarge,
                           TerminalError, UsageError)

if TYPE_CHECKING:
    from oncely.client import Client

# The one declaration of the version; pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "App", "AwakeableError", "Client", "ConfigError", "Context", "DurableFuture", "Handler", "KeyedContext",
    "NonDeterminismError", "OncelyError", "RecordTooLarge", "RetryPolicy", "Service", "TerminalError",
    "UsageError", "gather",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from oncely.client import Client

        return Client
    raise AttributeError(f"module 'oncely' has no attribute {name!r}")
