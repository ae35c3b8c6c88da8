"""`RemoteExecutor`: runs invocations of remote services through their
deployment's endpoint, behind the same executor boundary as in-process
handlers (`start(call, done)`), so the partition never knows which ran.

Each invocation is an asyncio task looping: send the item (journal, eager
state) → apply the answer's new entries through `call.effects` → by status:
completed / terminal / retry / paused end it with an `Outcome`; suspended
waits (`effects.wait`, like a suspended coroutine, so idle suspension and
resume by replay are the in-process paths) on the awaited entries, then
sends the item again with the completed journal; yield sends it again at
once; need_state sends it again with the names asked for. A request that
gets no answer is retried with the service's backoff without counting an
attempt; after `remote_transport_budget` seconds the invocation pauses
("endpoint unreachable"), never dead-letters: the handler decided nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

from oncely.errors import TerminalError
from oncely.remote import apply
from oncely.remote.answers import Answer, BadAnswer
from oncely.remote.breaker import Breaker
from oncely.remote.registry import Deployment, signing_key_from_env
from oncely.remote.transport import Batcher, CircuitOpen, Refused, Unreachable
from oncely.sdk.protocol import HandlerCall, Outcome
from oncely.sdk.runner import describe_error
from oncely.shuffle.ids import format_id, parse_awakeable

if TYPE_CHECKING:
    import aiohttp

    from oncely.app import App, RetryPolicy
    from oncely.remote.signing import SigningKey
    from oncely.sdk.protocol import Executor, Running

log = logging.getLogger("oncely.remote")

MAX_STATE_ROUNDS = 8
LINGER_S = 0.002
MAX_BATCH = 32
CONNECTIONS_PER_HOST = 16


class RemoteExecutor:
    """Executes invocations of remote services; one aiohttp session, one
    batcher per (deployment, log partition)."""

    def __init__(self, app: App, deployments: dict[str, Deployment], key: SigningKey | None = None,
                 max_batch: int = MAX_BATCH, linger: float = LINGER_S) -> None:
        self.app = app
        self.deployments = deployments
        self.key = key
        self.max_batch = max_batch
        self.linger = linger
        self.session: aiohttp.ClientSession | None = None
        self.batchers: dict[tuple[str, int], Batcher] = {}
        self.breakers: dict[str, Breaker] = {}  # one circuit per deployment, shared by its batchers
        self.transport_retries = 0

    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> asyncio.Task[Outcome]:
        task = asyncio.get_running_loop().create_task(self._run(call))

        def finished(t: asyncio.Task[Outcome]) -> None:
            if t.cancelled():
                return
            try:
                outcome = t.result()
            except BaseException as e:
                log.exception("%s: the remote executor failed", format_id(call.invocation_id))
                outcome = Outcome("retry", error=f"internal error: {describe_error(e)}")
            done(outcome)

        task.add_done_callback(finished)
        return task

    def _batcher(self, dep: Deployment, app_name: str, partition: int, call: HandlerCall) -> Batcher:
        b = self.batchers.get((dep.id, partition))
        if b is None or b.dep is not dep:  # new, or its registration was replaced (--force)
            if self.session is None:
                import aiohttp

                self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=CONNECTIONS_PER_HOST))
            breaker = self.breakers.get(dep.id)
            if breaker is None:
                breaker = self.breakers[dep.id] = Breaker(dep.id)
            b = self.batchers[(dep.id, partition)] = Batcher(
                self.session, dep, app_name, partition, self.key, self.app.config.remote_deadline_ms, call.limits,
                self.max_batch, self.linger, breaker)
        return b

    async def _run(self, call: HandlerCall) -> Outcome:
        svc = self.app.services[call.service]
        # Pinned: the deployment that first ran it, whatever was registered
        # since (REMOTE.md D.5); else the newest one serving the service.
        dep = self.deployments.get(call.deployment or svc.deployment or "")
        if dep is None:
            if call.deployment is not None:
                return Outcome("paused", error=f"deployment {call.deployment}, which this invocation is pinned to, "
                                               "is not registered (removed?)")
            return Outcome("paused", error=f"deployment {svc.deployment} of service {call.service!r} is not "
                                           "registered (removed?)")
        if call.effects is None:
            return Outcome("terminal", error="a remote invocation needs the processor's effects")
        part = getattr(call.effects, "part", None)  # the partition's own effects: no id to format and parse
        if part is not None:
            app_name, partition = part.app.name, part.partition
        else:
            app_name, partition, _, _ = parse_awakeable(call.effects.awakeable_id(0))
        batcher = self._batcher(dep, app_name, partition, call)
        try:
            payload = apply.item_input(self.app, call)
        except TerminalError as e:
            return Outcome("terminal", error=e.message)
        cfg = self.app.config
        wanted: set[str] = set()
        names_wanted = False
        rounds = 0
        # One wait per awaited entry, kept across rounds: cancelling a wait
        # would cancel the partition's future for its entry.
        waits: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                if self.deployments.get(dep.id) is not dep:  # removed, or replaced (--force), meanwhile
                    if dep.id not in self.deployments:
                        what = "which this invocation is pinned to" if call.deployment else f"of {call.service!r}"
                        return Outcome("paused", error=f"deployment {dep.id}, {what}, is not registered (removed?)")
                    dep = self.deployments[dep.id]
                    batcher = self._batcher(dep, app_name, partition, call)
                state = apply.snapshot(call, cfg.remote_eager_state_bytes, wanted, names_wanted)
                answer = await self._exchange(batcher, call, apply.build_item(call, payload, state), svc.retry)
                if isinstance(answer, Outcome):
                    return answer
                try:
                    apply.apply_entries(call, answer)
                except TerminalError as e:
                    return Outcome("terminal", error=e.message)
                except BadAnswer as e:
                    return Outcome("paused", error=f"invalid answer from {dep.uri}: {e}")
                if call.deployment is None:  # its first applied answer: pinned, in this transaction
                    call.deployment = dep.id
                    call.effects.pin(dep.id)  # type: ignore[attr-defined]
                status = answer.status
                if log.isEnabledFor(logging.DEBUG):  # format_id costs a base32 encode per answer
                    log.debug("%s: %s after %d new entries (journal %d)", format_id(call.invocation_id), status,
                              len(answer.entries), len(call.journal))
                if status == "completed":
                    return apply.completed(call, answer)
                if status in ("terminal", "retry", "paused"):
                    return Outcome(status, error=answer.error)  # type: ignore[arg-type]
                if status == "unknown_handler":
                    return Outcome("paused", error=f"{dep.uri}: {answer.error}")
                if status == "suspended":
                    await _wait_any(call, answer.awaiting, waits)
                elif status == "need_state":
                    rounds += 1
                    if rounds > MAX_STATE_ROUNDS:
                        return Outcome("paused", error=f"{dep.uri} asked for state {rounds} times in one attempt")
                    wanted.update(answer.names)
                    names_wanted = names_wanted or answer.keys
                # "yield": send it again at once, with the entries it made
        finally:
            for t in waits.values():
                t.cancel()

    async def _exchange(self, batcher: Batcher, call: HandlerCall, item: dict[str, Any],
                        policy: RetryPolicy) -> Answer | Outcome:
        """The item's answer; transport failures retried with the service's
        backoff (attempts unchanged) until the budget is spent (paused)."""
        loop = asyncio.get_running_loop()
        budget = self.app.config.remote_transport_budget
        since: float | None = None
        failures = 0
        sent = (call.invocation_id, len(call.journal))
        while True:
            try:
                return await batcher.submit(item, sent)
            except Refused as e:
                return Outcome("paused", error=f"{batcher.dep.uri}: {e}")
            except Unreachable as e:
                now = loop.time()
                since = now if since is None else since
                if now - since >= budget:
                    return Outcome("paused", error=f"endpoint unreachable: {batcher.dep.uri}: {e} "
                                                   f"(retried for {now - since:.1f} s)")
                failures += 1
                self.transport_retries += 1
                delay = policy.delay(failures)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, 60.0))
                delay = min(delay, since + budget - now)
                log.log(logging.DEBUG if isinstance(e, CircuitOpen) else logging.INFO,
                        "%s: %s unreachable (%s); again in %.2f s", format_id(call.invocation_id),
                        batcher.dep.uri, e, delay)
                await asyncio.sleep(delay)  # a timer on the loop: the partition goes on meanwhile

    async def close(self) -> None:
        for b in self.batchers.values():
            b.close()
        self.batchers.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None


async def _wait_any(call: HandlerCall, awaiting: list[int], waits: dict[int, asyncio.Task[None]]) -> None:
    """Until one of the awaited entries completes (at once if one has). The
    waits are the in-process ones: a long one suspends the invocation (this
    task is cancelled) and a completion resumes it by a new start."""
    journal = call.journal
    if any(journal[i].completed for i in awaiting):
        return
    effects = call.effects
    assert effects is not None
    loop = asyncio.get_running_loop()
    for i in awaiting:
        if i not in waits:
            waits[i] = loop.create_task(effects.wait(i))
    done, _ = await asyncio.wait([waits[i] for i in set(awaiting)], return_when=asyncio.FIRST_COMPLETED)
    for i in [i for i, t in waits.items() if t in done]:
        waits.pop(i).result()  # a wait on a dropped invocation raises CancelledError


class RoutingExecutor:
    """In-process handlers run locally; services of a deployment remotely."""

    def __init__(self, app: App, local: Executor, remote: RemoteExecutor) -> None:
        self.app = app
        self.local = local
        self.remote = remote
        # Services without a deployment run in `local`; their first steps may run in place.
        self.in_process = getattr(local, "in_process", None)

    def start(self, call: HandlerCall, done: Callable[[Outcome], None]) -> Running:
        svc = self.app.services.get(call.service)
        if svc is not None and svc.deployment is not None:
            return self.remote.start(call, done)
        return self.local.start(call, done)

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()


def executor_for(app: App) -> Any:
    """The processor's executor: routes by service, so a deployment
    registered while it runs (`app.remote_deployments`, kept by
    remote/deployments.py) is used without a restart."""
    from oncely.processor.executor import LocalExecutor

    cfg = app.config
    remote = RemoteExecutor(app, app.remote_deployments, signing_key_from_env(), cfg.remote_max_batch,
                            cfg.remote_linger)
    return RoutingExecutor(app, LocalExecutor(app), remote)
