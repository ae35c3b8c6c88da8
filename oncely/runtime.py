"""Wiring: load an app, create its topics, run its processor until signalled."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from oncely.app import App
from oncely.errors import ConfigError
from oncely.preflight import connect_app
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
    admin = connect_app(app)  # settings checked and the broker reached before any topic is created
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


class ProcessorThread:
    """An app's processor on its own event loop in a background thread, for
    tests and benchmarks that drive it from the same Python process and read
    its counters (`processor` is the CommitLoop). For crash tests, run
    `oncely run` as a subprocess instead: a thread cannot be killed -9."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.processor: CommitLoop | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        def created(cl: CommitLoop) -> None:
            self.processor = cl

        async def main() -> None:
            self.stop_event = asyncio.Event()
            await serve(self.app, self.stop_event, on_created=created)

        try:
            self.loop.run_until_complete(main())
        except BaseException as e:  # raised again by start()/stop()
            self.error = e

    def start(self, timeout: float = 60.0) -> "ProcessorThread":
        """Start and wait until the processor has joined its group (or failed,
        e.g. with a ConfigError, which is raised here)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.error and (self.processor is None or self.processor.consumer is None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the processor of {self.app.name!r} did not start within {timeout} s")
            time.sleep(0.02)
        if self.error:
            raise self.error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop as SIGTERM would (commit, close, leave the group) and wait."""
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the processor of {self.app.name!r} did not stop within {timeout} s")
        if self.error:
            raise self.error
