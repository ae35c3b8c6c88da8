"""oncely: a Kafka-native exactly-once event processor.

Durable keyed handlers whose journals and state live in a local RocksDB fed
by a changelog topic; one Kafka transaction per commit carries state changes,
produced records and consumer offsets.
"""

from oncely.app import App, Handler, RetryPolicy, Service
from oncely.client import Client
from oncely.context import Context, DurableFuture, gather
from oncely.errors import (AwakeableError, ConfigError, NonDeterminismError, OncelyError, RecordTooLarge,
                           TerminalError, UsageError)

__version__ = "0.1.0"

__all__ = [
    "App", "AwakeableError", "Client", "ConfigError", "Context", "DurableFuture", "Handler", "NonDeterminismError",
    "OncelyError", "RecordTooLarge", "RetryPolicy", "Service", "TerminalError", "UsageError", "gather",
]
