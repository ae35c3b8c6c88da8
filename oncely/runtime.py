"""Wiring: load an app, create its topics, run its processor until signalled."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

from confluent_kafka.admin import AdminClient

from oncely.app import App
from oncely.errors import ConfigError
from oncely.processor.commit_loop import CommitLoop
from oncely.topics import ensure_topics

log = logging.getLogger("oncely")


def load_app(spec: str) -> App:
    """Import `module:attribute` (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} (from {spec!r}): {e}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise ConfigError(f"{spec!r}: {module_name}.{attr} is not an oncely.App")
    return app


async def serve(app: App, stop: asyncio.Event | None = None,
                on_created: Callable[[CommitLoop], None] | None = None) -> CommitLoop:
    """Run the app's processor in this event loop until `stop` is set (or
    SIGTERM/SIGINT arrives); returns the stopped loop (for its counters)."""
    cfg = app.config
    if not cfg.bootstrap:
        raise ConfigError(
            "no Kafka bootstrap address: pass --bootstrap HOST:PORT, App(..., bootstrap=...) "
            "or set ONCELY_KAFKA_BOOTSTRAP"
        )
    admin = AdminClient({"bootstrap.servers": cfg.bootstrap, **cfg.kafka})
    facts = ensure_topics(admin, app)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    processor = CommitLoop(app, cfg, facts)
    if on_created is not None:
        on_created(processor)
    log.info("oncely app %r: %d partitions, bootstrap %s, state %s", app.name, app.partitions, cfg.bootstrap,
             cfg.state_dir)
    await processor.run(stop)
    return processor


def run(app: App) -> None:
    asyncio.run(serve(app))
