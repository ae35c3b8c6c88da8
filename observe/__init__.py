"""Observability: Prometheus metrics (with consumer lag), and the data
behind `oncely status`.

- `metrics.py`: `Metrics`, the counters the engine's hook calls feed (no
  prometheus-client needed; every hook is a few dict operations);
- `lag.py`: consumer lag of a group from Kafka itself, against the last
  stable offset; `LagWatcher` refreshes it off the event loop;
- `collector.py`: the Prometheus collector reading a running `CommitLoop`,
  its `Metrics` and the lag cache at scrape time;
- `server.py`: `/metrics` over aiohttp on the processor's own event loop;
- `status.py`: what `oncely status` shows, from Kafka and metrics endpoints;
- `tracing.py`: OpenTelemetry spans of invocations and the traceparent of
  Invokes (the optional extra oncely[tracing]).
"""

from oncely.observe.metrics import Metrics

__all__ = ["Metrics"]
