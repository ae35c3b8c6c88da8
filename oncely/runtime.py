"""Wiring: load an app, create its topics, run its processor until signalled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TypeVar

from oncely.app import App
from oncely.errors import ConfigError
from oncely.preflight import connect_app
from oncely.processor.commit_loop import CommitLoop
from oncely.processor.txn_state import GiveUp
from oncely.topics import ensure_topics

if TYPE_CHECKING:
    from oncely.gateway.admin import AdminServer
    from oncely.gateway.server import GatewayServer
    from oncely.observe.server import MetricsServer

log = logging.getLogger("oncely")
T = TypeVar("T")


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


def _on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, interrupt: threading.Event) -> None:
    """SIGTERM/SIGINT stop the processor cleanly; a second one exits at once.

    A plain signal handler (not loop.add_signal_handler): it runs on the main
    thread between bytecodes, also while the loop thread waits on a Kafka
    client call, so a stop request can end that wait (worker.py)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: object) -> None:
        if interrupt.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: stopping", signal.Signals(signum).name)
        interrupt.set()
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


async def serve(app: App, stop: asyncio.Event | None = None,
                on_created: Callable[[CommitLoop], None] | None = None, metrics: str | None = None,
                on_metrics: Callable[["MetricsServer"], None] | None = None, tracing: bool = False,
                http: str | None = None, on_http: Callable[["GatewayServer"], None] | None = None,
                admin: str | None = None, admin_token: str | None = None,
                on_admin: Callable[["AdminServer"], None] | None = None) -> CommitLoop:
    """Run the app's processor in this event loop until `stop` is set (or
    SIGTERM/SIGINT arrives); returns the stopped loop (for its counters).
    `metrics` (HOST:PORT) serves Prometheus metrics there, on this loop;
    `http` (HOST:PORT) serves the HTTP ingress (oncely.gateway) there, on
    a thread of its own (commits do not stall it); `admin` (HOST:PORT) the
    admin API (gateway/admin.py, `admin_token`).
    Invocations are traced when a TracerProvider is set, or with `tracing`
    from the OTEL_* environment (observe.tracing)."""
    from oncely.observe.tracing import setup as setup_tracing

    cfg = app.config
    setup_tracing(app.name, install=tracing)
    if metrics is not None:
        from oncely.observe.server import parse_address, require_client

        require_client()  # before anything else: a missing extra is one sentence
        parse_address(metrics)
    if http is not None:
        from oncely.gateway.openapi import require_apispec
        from oncely.gateway.server import parse_address as parse_http

        require_apispec()
        parse_http(http)
    if admin is not None:
        from oncely.gateway.admin import check_exposure
        from oncely.gateway.openapi import require_apispec

        require_apispec()
        check_exposure(admin, admin_token)
    stop = stop or asyncio.Event()
    interrupt = threading.Event()
    _on_signals(asyncio.get_running_loop(), stop, interrupt)
    # Settings checked and the broker reached before any topic is created;
    # both block (bounded), so they run off the loop thread.
    kafka_admin = await asyncio.to_thread(connect_app, app)
    facts = await asyncio.to_thread(ensure_topics, kafka_admin, app)
    # Registered deployments (remote handlers) are read, and followed from
    # now on, before any partition routes an invocation.
    from oncely.remote.watch import DeploymentWatcher

    deployments = await DeploymentWatcher(app).start()
    processor: CommitLoop | None = None
    server = gateway = admin_server = None
    try:  # whatever started is stopped, also when a later part fails to start
        for sub in app.subscriptions:  # a "service/handler" target must now be known
            if hasattr(sub.target, "check"):
                sub.target.check()
        processor = CommitLoop(app, cfg, facts, interrupt)
        if on_created is not None:
            on_created(processor)
        if metrics is not None:
            from oncely.observe.server import MetricsServer

            server = await MetricsServer(processor, metrics).start()
            if on_metrics is not None:
                on_metrics(server)
        if http is not None:
            from oncely.gateway.server import GatewayThread

            gateway = GatewayThread(app, http)
            server_ = await asyncio.to_thread(gateway.start)
            if on_http is not None:
                on_http(server_)
        if admin is not None:
            from oncely.gateway.admin import AdminServer

            admin_server = await AdminServer(app, admin, admin_token).start()
            if on_admin is not None:
                on_admin(admin_server)
        log.info("oncely app %r: %d partitions, bootstrap %s, state %s", app.name, app.partitions, cfg.bootstrap,
                 cfg.state_dir)
        await processor.run(stop)
    finally:
        if admin_server is not None:
            await admin_server.stop()
        if gateway is not None:
            await asyncio.to_thread(gateway.stop)
        if server is not None:
            await server.stop()
        await deployments.stop()
        close = getattr(processor.executor, "close", None) if processor is not None else None
        if close is not None:
            await close()  # the remote executor's HTTP session
    return processor


# The cyclic GC's thresholds in an `oncely run` process (Python's default is
# (700, 10, 10)). Every record makes short-lived containers (decoded
# records, invocations, contexts) that live about one commit interval:
# collected every 700 allocations, they are scanned and promoted again and
# again before they die by reference counting anyway. A profile of the
# enrichment benchmark put ~10 % of the process's CPU in the collector.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """For a process that runs the processor and nothing else (`oncely
    run`): what is loaded by now (modules, the app) lives as long as the
    process, so it leaves the collector's generations (`gc.freeze`), and
    the first generation is collected less often. Embedded processors
    (`ProcessorThread`) leave their process's GC alone."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(app: App, metrics: str | None = None, tracing: bool = False, http: str | None = None,
        admin: str | None = None, admin_token: str | None = None) -> None:
    """Run until signalled. A process that had to abandon a Kafka client
    stuck inside librdkafka exits with os._exit: a normal exit would wait on
    that client's threads forever. A supervisor restarts it; its state is
    safe in Kafka."""
    code = 0
    tune_gc()
    try:
        processor = asyncio.run(serve(app, metrics=metrics, tracing=tracing, http=http, admin=admin,
                                      admin_token=admin_token))
    except GiveUp as e:
        log.error("%s", e)
        code = 75  # EX_TEMPFAIL: restart me
        processor = None
    if code or (processor is not None and processor.abandoned):
        if processor is not None and processor.abandoned:
            log.warning("exiting without closing %d Kafka client(s) stuck in librdkafka", processor.abandoned)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ProcessorThread:
    """An app's processor on its own event loop in a background thread, for
    tests and benchmarks that drive it from the same Python process and read
    its counters (`processor` is the CommitLoop). For crash tests, run
    `oncely run` as a subprocess instead: a thread cannot be killed -9.
    With `metrics` (HOST:PORT; port 0 picks a free one) it serves /metrics
    at `metrics_url` once started."""

    def __init__(self, app: App, metrics: str | None = None, http: str | None = None, admin: str | None = None,
                 admin_token: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_server: "MetricsServer | None" = None
        self.http = http
        self.gateway: "GatewayServer | None" = None
        self.admin, self.admin_token = admin, admin_token
        self.admin_server: "AdminServer | None" = None
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
            await serve(self.app, self.stop_event, on_created=created, metrics=self.metrics,
                        on_metrics=lambda server: setattr(self, "metrics_server", server), http=self.http,
                        on_http=lambda gw: setattr(self, "gateway", gw), admin=self.admin,
                        admin_token=self.admin_token, on_admin=lambda a: setattr(self, "admin_server", a))

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

    @property
    def metrics_url(self) -> str:
        server = self.metrics_server
        assert server is not None, "started without metrics"
        host = "127.0.0.1" if server.host in ("0.0.0.0", "") else server.host
        return f"http://{host}:{server.port}/metrics"

    def on_loop(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """`fn()` run on the processor's loop thread, between two of its
        steps: how a test reads the processor's live state consistently."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop as SIGTERM would (commit, close, leave the group) and wait."""
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the processor of {self.app.name!r} did not stop within {timeout} s")
        if self.error:
            raise self.error
