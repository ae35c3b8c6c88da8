"""A processor follows `<app>.deployments`: it reads the topic whole before
serving, then applies every registration and removal while it runs, so a
deployment registered with `oncely deployments register` takes new
invocations of its services without a restart.

librdkafka's calls block, so one thread reads the topic and hands each
batch of records to the event loop (`call_soon_threadsafe`); it takes the
next batch only after the loop applied the last (memory stays bounded, the
loop never waits on Kafka). Applying a batch updates `app.services` (each
remotely served service points at its newest deployment) and
`app.remote_deployments` (what the RemoteExecutor sends to), on the loop
thread that reads them. Deployments the app names itself
(`App(deployments=[…])`, ONCELY_DEPLOYMENTS) are registered at start when
the topic does not hold them yet, with the checks of `oncely deployments
register` (no force).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from oncely.errors import ConfigError
from oncely.logs import kafka_conf_logging
from oncely.remote.deployments import DeploymentAdmin, Registrations
from oncely.remote.registry import DiscoveryFailed, deployment_id
from oncely.shuffle.ids import random_id

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.remote")

CATCH_UP_TIMEOUT_S = 60.0
BATCH = 100


class DeploymentWatcher:
    """Reads `<app>.deployments` on a thread; the loop applies what it reads."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.topic = app.deployments_topic
        self.regs = Registrations()
        base = {**kafka_conf_logging(), "bootstrap.servers": app.config.bootstrap, **app.config.kafka}
        self.consumer = Consumer({**base, "group.id": f"{app.name}.deployments-{random_id().hex()[:8]}",
                                  "enable.auto.commit": False, "enable.partition.eof": True,
                                  "auto.offset.reset": "earliest", "fetch.wait.max.ms": 100})
        self.loop: asyncio.AbstractEventLoop | None = None
        self.caught_up: asyncio.Future[None] | None = None
        self.applied = 0  # records applied
        self.changed = asyncio.Event()  # set when a batch was applied
        self._taken = threading.Semaphore(1)  # one batch in the loop's hands at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> DeploymentWatcher:
        """Read the topic to its end and apply it, then follow it; register
        the app's own deployments that are missing. ConfigError when the
        topic cannot be read in time or such a deployment is refused."""
        self.loop = asyncio.get_running_loop()
        self.caught_up = self.loop.create_future()
        self.consumer.assign([TopicPartition(self.topic, 0, -2)])  # -2: the beginning
        self._thread = threading.Thread(target=self._read, name="deployments-reader", daemon=True)
        self._thread.start()
        try:
            await asyncio.wait_for(asyncio.shield(self.caught_up), CATCH_UP_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            raise ConfigError(f"could not read {self.topic} within {CATCH_UP_TIMEOUT_S:.0f} s") from None
        # The app's own deployments: registered when missing, their manifest
        # refreshed when the endpoint at that URI changed without breaking
        # anything; one that cannot be reached keeps its registration.
        written: dict[str, int] = {}  # id -> registered_at_ms of the record written
        if self.app.deployments:
            admin = DeploymentAdmin.for_app(self.app)
            for uri in self.app.deployments:
                known = deployment_id(uri) in self.regs.by_id
                try:
                    result = await admin.register(uri, allow_local=True, replace=True)
                except DiscoveryFailed as e:
                    if not known:
                        await self.stop()
                        raise
                    log.warning("%s; using its registration", e)
                    continue
                except BaseException:
                    await self.stop()
                    raise
                if result.created:
                    written[result.id] = result.registered_at_ms
                    log.info("registered deployment %s (%s) named by the app: services %s", result.id, uri,
                             ", ".join(result.services) or "(none)")
        # Served only once the reader applied them: every service must be
        # known before a partition routes an invocation.
        deadline = self.loop.time() + CATCH_UP_TIMEOUT_S
        while any(self.regs.by_id.get(i) is None or self.regs.by_id[i].registered_at_ms < at
                  for i, at in written.items()):
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                await self.stop()
                raise ConfigError(f"the registrations of {sorted(written)} did not come back from "
                                  f"{self.topic}") from None
        return self

    async def stop(self) -> None:
        self._stop.set()
        self._taken.release()  # a reader waiting for the loop gives up
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        await asyncio.to_thread(self.consumer.close)

    # -- the reader thread ----------------------------------------------------------

    def _read(self) -> None:
        eof_seen = False
        while not self._stop.is_set():
            try:
                # poll returns at the first record (consume would wait out its
                # timeout for a full batch); then what is buffered.
                first = self.consumer.poll(0.5)
                msgs = [] if first is None else [first, *self.consumer.consume(BATCH - 1, 0)]
            except KafkaException as e:  # pragma: no cover - logged, the reader keeps going
                log.warning("deployments reader: %s", e)
                continue
            batch: list[tuple[bytes | None, bytes | None]] = []
            eof = False
            for m in msgs:
                err = m.error()
                if err is None:
                    batch.append((m.key(), m.value()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    eof = True
                else:
                    log.warning("deployments reader: %s", err)
            if not batch and not (eof and not eof_seen):
                continue
            first_eof = eof and not eof_seen
            eof_seen = eof_seen or eof
            while not self._taken.acquire(timeout=0.5):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            assert self.loop is not None
            try:
                self.loop.call_soon_threadsafe(self._apply, batch, first_eof)
            except RuntimeError:  # the loop is closed
                return

    # -- on the loop ------------------------------------------------------------------

    def _apply(self, batch: list[tuple[bytes | None, bytes | None]], caught_up: bool) -> None:
        try:
            if batch:
                before = {d.id: d for d in self.regs.by_id.values()}
                for key, value in batch:
                    self.regs.apply(key, value)
                self.applied += len(batch)
                self.changed.set()
                self.regs.install(self.app)
                _log_changes(before, self.regs)
            if caught_up and self.caught_up is not None and not self.caught_up.done():
                self.caught_up.set_result(None)
        except Exception:  # pragma: no cover - a bug here must not stop the reader
            log.exception("applying deployments failed")
        finally:
            self._taken.release()


def _log_changes(before: dict[str, Any], regs: Registrations) -> None:
    for dep_id, dep in regs.by_id.items():
        if before.get(dep_id) is not dep and (before.get(dep_id) is None
                                              or before[dep_id].manifest != dep.manifest):
            log.info("deployment %s (%s) registered: services %s", dep_id, dep.uri, ", ".join(dep.services()))
    for dep_id in set(before) - set(regs.by_id):
        log.info("deployment %s (%s) removed", dep_id, before[dep_id].uri)
