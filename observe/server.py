"""`/metrics` of a processor, served by aiohttp on the processor's own event
loop: a scrape runs the collector between two loop steps, so it reads the
engine's dicts on the thread that changes them, with no lock and no copy.
The collector calls nothing blocking (consumer lag comes from the
`LagWatcher` thread's cache), so a scrape costs the loop about a
millisecond.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from confluent_kafka import OFFSET_END

from oncely.errors import ConfigError
from oncely.observe.lag import LagReader, LagWatcher
from oncely.observe.metrics import Metrics

if TYPE_CHECKING:
    from oncely.processor.commit_loop import CommitLoop

log = logging.getLogger("oncely.observe")

INSTALL = "pip install 'oncely[metrics]'"
LAG_INTERVAL = 5.0  # seconds between consumer-lag reads


def require_client() -> None:
    """prometheus-client is an extra: say how to get it, in one sentence."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(f"--metrics needs the prometheus-client package: {INSTALL}") from None
    del prometheus_client  # only whether it imports


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (`:9464` listens on every interface)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """Counts a processor's metrics (`processor.metrics`), watches its
    group's lag and serves both at http://HOST:PORT/metrics."""

    def __init__(self, processor: "CommitLoop", address: str, lag_interval: float | None = None) -> None:
        require_client()
        self.processor = processor
        self.host, self.port = parse_address(address)
        self.metrics = Metrics()
        processor.metrics = self.metrics
        lag_interval = lag_interval or LAG_INTERVAL
        from_end = set(processor.sources) if processor.source_start == OFFSET_END else set()
        reader = LagReader(processor.clients.base(), processor.app.name, [processor.app.log_topic, *processor.sources],
                           from_end, timeout=min(5.0, lag_interval * 2))
        self.lag = LagWatcher(reader, lag_interval)
        self._runner: web.AppRunner | None = None

    async def start(self) -> "MetricsServer":
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        from oncely.observe.collector import ProcessorCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProcessorCollector(self.processor, self.metrics, self.lag))  # type: ignore[arg-type]

        async def scrape(_request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ConfigError(f"--metrics {self.host}:{self.port}: cannot listen there ({e.strerror or e})") from None
        if self.port == 0:  # a free port was chosen (tests)
            self.port = self._runner.addresses[0][1]
        self.lag.start()
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)
        return self

    async def stop(self) -> None:
        self.lag.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
