"""Registered deployments: `<app>.deployments`, and what may change there.

A registration is one record on the app's compacted topic
`<app>.deployments` (1 partition), keyed by the deployment id (`dp_…`, a
hash of the URI, so registering a URI again is idempotent); the value is a
`DeploymentRecord` (schemas/): the URI, the manifest as discovered, extra
request headers, the registration time. Removal is a tombstone. Every
processor reads the topic whole before serving and follows it
(remote/watch.py); the newest registration serving a service takes its new
invocations, an invocation already answered by one stays with it (its pin).

`DeploymentAdmin` is what the CLI (`oncely deployments …`) and an admin API
call. Its errors (remote/registry.py) carry the HTTP status to answer:
BadManifest 400, NotFound 404, Conflict 409, DiscoveryFailed 502,
DiscoveryTimeout 504; all are ConfigErrors (one line on the CLI).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from oncely import schemas
from oncely.remote.registry import (BadManifest, Conflict, Deployment, NotFound, deployment_id, discover,
                                    parse_manifest, register, service_specs, signing_key_from_env)

if TYPE_CHECKING:
    from oncely.app import App
    from oncely.remote.signing import SigningKey

log = logging.getLogger("oncely.remote")

__all__ = ["BadManifest", "Conflict", "DeploymentAdmin", "Registered", "Registrations", "Removed", "Usage",
           "breaking_changes", "decode_record", "encode_record"]


def encode_record(dep: Deployment) -> bytes:
    return schemas.encode("deployment", {"id": dep.id, "uri": dep.uri, "manifest": dep.raw,
                                         "headers": dep.headers, "registered_at_ms": dep.registered_at_ms})


def decode_record(key: bytes, value: bytes) -> Deployment:
    """A registration read back; ValueError when it does not hold one (the
    manifest is checked again: the topic is writable by anyone with access)."""
    rec = schemas.decode("deployment", value)
    if rec["id"].encode() != key or deployment_id(rec["uri"]) != rec["id"]:
        raise ValueError(f"registration {key!r} names {rec['id']} / {rec['uri']}")
    dep = parse_manifest(rec["uri"], rec["manifest"])
    dep.headers = dict(rec["headers"])
    dep.registered_at_ms = rec["registered_at_ms"]
    return dep


class Registrations:
    """The registered deployments, as the topic holds them (latest per id)."""

    def __init__(self) -> None:
        self.by_id: dict[str, Deployment] = {}

    def apply(self, key: bytes | None, value: bytes | None) -> Deployment | None:
        """One record of the topic; the deployment it registers (None: a
        tombstone). A malformed record is logged and skipped."""
        if key is None:
            return None
        if value is None:
            self.by_id.pop(key.decode(errors="replace"), None)
            return None
        try:
            dep = decode_record(key, value)
        except (ValueError, schemas.SchemaError) as e:
            log.error("skipping registration %r on the deployments topic: %s", key, e)
            return None
        self.by_id[dep.id] = dep
        return dep

    def ordered(self) -> list[Deployment]:
        """Oldest first (registration time, then id)."""
        return sorted(self.by_id.values(), key=lambda d: (d.registered_at_ms, d.id))

    def latest(self) -> dict[str, Deployment]:
        """service → the newest deployment serving it."""
        out: dict[str, Deployment] = {}
        for dep in self.ordered():
            for name in dep.services():
                out[name] = dep
        return out

    def install(self, app: App) -> None:
        """Make `app` run what is registered: each service served remotely
        points at its newest deployment; `app.remote_deployments` (the
        executor's map) holds exactly the registered ones, so an invocation
        pinned to a removed one pauses. A service no deployment serves any
        more stays known (its invocations pause instead of dead-lettering)."""
        for dep in self.ordered():
            try:
                local = register(app, dep)
            except Exception as e:  # a bad retry policy, a bad name: the others still apply
                log.error("deployment %s (%s) not used: %s", dep.id, dep.uri, e)
                continue
            shadowed = sorted(set(dep.services()) - set(local))
            if shadowed:
                log.warning("deployment %s: services %s are defined in this process and stay in-process",
                            dep.id, ", ".join(shadowed))
        app.remote_deployments.clear()
        app.remote_deployments.update(self.by_id)


def breaking_changes(old: Deployment, new: Deployment) -> list[str]:
    """What `new` breaks for invocations of services `old` serves: a service
    dropped, its keyed flag changed, a handler removed."""
    out = []
    new_services = new.services()
    for name, s in old.services().items():
        n = new_services.get(name)
        if n is None:
            continue  # not served by the new one: the old one keeps it
        if n["keyed"] != s["keyed"]:
            out.append(f"service {name!r} changes from {'keyed' if s['keyed'] else 'stateless'} "
                       f"to {'keyed' if n['keyed'] else 'stateless'}")
        gone = sorted({h["name"] for h in s["handlers"]} - {h["name"] for h in n["handlers"]})
        if gone:
            out.append(f"service {name!r} drops handler(s) {', '.join(gone)}")
    return out


@dataclass
class Registered:
    """`register`'s answer: `created` False when the same manifest was
    registered already (HTTP 200, else 201); `dry_run`: nothing written."""
    id: str
    uri: str
    services: list[str]
    created: bool
    replaced: bool = False  # the URI was registered with another manifest (forced)
    dry_run: bool = False
    warnings: list[str] | None = None  # breaking changes let through by force
    registered_at_ms: int = 0  # of the record written


@dataclass
class Usage:
    """In-flight invocations a deployment matters to, from the committed
    changelog: `pinned` to it, and `pending` (not yet pinned, targeting a
    service it is the newest deployment of)."""
    pinned: int
    pending: int


@dataclass
class Removed:
    id: str
    usage: Usage


class DeploymentAdmin:
    """Register, list, describe and remove an app's deployments. Every
    method is a coroutine; Kafka calls run in threads, so it can serve an
    admin API on the processor's loop. `local_services`: services the app
    defines in-process (a deployment may not take one over)."""

    def __init__(self, app_name: str, bootstrap: str, kafka: dict[str, Any] | None = None,
                 local_services: Iterable[str] = (), key: SigningKey | None = None) -> None:
        self.app_name = app_name
        self.bootstrap = bootstrap
        self.kafka = dict(kafka or {})
        self.local_services = frozenset(local_services)
        self.key = key

    @classmethod
    def for_app(cls, app: App) -> DeploymentAdmin:
        if not app.config.bootstrap:
            from oncely.errors import ConfigError

            raise ConfigError(f"app {app.name!r} has no bootstrap: pass --bootstrap or set ONCELY_KAFKA_BOOTSTRAP")
        local = [name for name, s in app.services.items() if s.deployment is None]
        return cls(app.name, app.config.bootstrap, app.config.kafka, local, signing_key_from_env())

    @property
    def topic(self) -> str:
        return f"{self.app_name}.deployments"

    # -- Kafka (blocking; run in threads) ---------------------------------------

    def _read(self) -> Registrations:
        from oncely.errors import ConfigError
        from oncely.kafka_io import read_to_end

        regs = Registrations()
        try:
            records = read_to_end(self.bootstrap, self.topic, config=self.kafka)
        except ValueError:
            raise ConfigError(f"app {self.app_name!r} has no topic {self.topic} at {self.bootstrap}: check the "
                              "name (an app's topics are created when its processor first starts)") from None
        for r in records:
            regs.apply(r.key, r.value)
        return regs

    def _write(self, key: str, value: bytes | None) -> None:
        from oncely.kafka_io import produce

        produce(self.bootstrap, self.topic, [(key.encode(), value)], partition=0, config=self.kafka)

    def _usage(self, dep: Deployment, regs: Registrations) -> Usage:
        from oncely.admin import changelog_latest
        from oncely.processor import keys

        newest = {name for name, d in regs.latest().items() if d.id == dep.id}
        pinned = pending = 0
        for k, v in changelog_latest(self.bootstrap, self.app_name, config=self.kafka).items():
            if k[:1] not in (keys.STATUS, keys.INBOX, keys.READY):
                continue
            st = schemas.decode("invocation_status", v)
            pin = st.get("deployment")
            if pin == dep.id:
                pinned += 1
            elif pin is None and st["invoke"]["service"] in newest:
                pending += 1
        return Usage(pinned, pending)

    # -- operations --------------------------------------------------------------

    async def register(self, uri: str, force: bool = False, dry_run: bool = False,
                       headers: dict[str, str] | None = None, allow_local: bool = False,
                       replace: bool = False) -> Registered:
        """Discover `uri` and register it. Refused (Conflict) unless `force`:
        a service the app defines in-process (unless `allow_local`: an app
        that names the deployment itself serves its own module remotely and
        keeps those services in-process), a breaking change against the
        newest deployment of a service (handler removed, keyed flag changed),
        the URI registered already with another manifest (unless `replace`:
        the endpoint at that URI changed in place, without breaking
        anything). DiscoveryFailed /
        DiscoveryTimeout / BadManifest when the endpoint does not answer
        with a usable manifest."""
        import aiohttp

        async with aiohttp.ClientSession() as session:
            dep = await discover(session, uri, self.key, headers)
        regs = await asyncio.to_thread(self._read)
        from oncely.app import RetryPolicy

        service_specs(dep, RetryPolicy())  # the names and retry policies as a processor will read them
        services = sorted(dep.services())
        local = [] if allow_local else sorted(set(services) & self.local_services)
        current = regs.by_id.get(dep.id)
        if current is not None and current.manifest == dep.manifest and current.headers == dep.headers:
            return Registered(dep.id, dep.uri, services, created=False, dry_run=dry_run)
        problems = [f"service(s) {', '.join(local)} are defined in-process by app {self.app_name!r} (they "
                    "would stay in-process)"] if local else []
        if current is not None and not replace:
            problems.append(f"{dep.id} is registered already with another manifest; --force replaces it "
                            "(invocations pinned to it then run the new code)")
        newest = regs.latest()
        for old in {newest[s].id: newest[s] for s in services if s in newest and newest[s].id != dep.id}.values():
            problems += [f"{p} (against {old.id}, {old.uri})" for p in breaking_changes(old, dep)]
        if current is not None:
            problems += breaking_changes(current, dep)
        if problems and not force:
            raise Conflict(f"deployment {uri}: refused without --force: {'; '.join(problems)}")
        if dry_run:
            return Registered(dep.id, dep.uri, services, created=current is None, replaced=current is not None,
                              dry_run=True, warnings=problems or None)
        dep.registered_at_ms = max([int(time.time() * 1000)] + [d.registered_at_ms + 1 for d in regs.by_id.values()])
        await asyncio.to_thread(self._write, dep.id, encode_record(dep))
        log.info("registered deployment %s (%s): services %s", dep.id, uri, ", ".join(services) or "(none)")
        return Registered(dep.id, dep.uri, services, created=True, replaced=current is not None,
                          warnings=problems or None, registered_at_ms=dep.registered_at_ms)

    async def list(self) -> list[dict[str, Any]]:
        """Every registration, oldest first: id, uri, registered_at_ms,
        services, and `newest_for` (the services whose new invocations it takes)."""
        regs = await asyncio.to_thread(self._read)
        newest = regs.latest()
        return [_summary(d, newest) for d in regs.ordered()]

    async def describe(self, dep_id: str) -> dict[str, Any]:
        """One registration in full (its manifest, headers' names) with
        `pinned` and `pending` counts from the committed changelog (a read of
        the whole changelog: a tool, not a query path; invocations that have
        not outlived a commit yet are not seen). NotFound."""
        regs = await asyncio.to_thread(self._read)
        dep = regs.by_id.get(dep_id)
        if dep is None:
            raise NotFound(f"no deployment {dep_id} is registered for app {self.app_name!r}")
        usage = await asyncio.to_thread(self._usage, dep, regs)
        return {**_summary(dep, regs.latest()), "headers": sorted(dep.headers), "manifest": dep.manifest,
                "pinned": usage.pinned, "pending": usage.pending}

    async def remove(self, dep_id: str, force: bool = False) -> Removed:
        """Tombstone a registration. Refused (Conflict) unless `force` while
        committed invocations are pinned to it, or wait for it without a pin
        for a service no other deployment serves. NotFound. Forced, its
        pinned invocations pause ("not registered") until it is registered
        again."""
        regs = await asyncio.to_thread(self._read)
        dep = regs.by_id.get(dep_id)
        if dep is None:
            raise NotFound(f"no deployment {dep_id} is registered for app {self.app_name!r}")
        usage = await asyncio.to_thread(self._usage, dep, regs)
        others = {s for d in regs.by_id.values() if d.id != dep_id for s in d.services()}
        orphaned = usage.pending if set(dep.services()) - others else 0
        if (usage.pinned or orphaned) and not force:
            raise Conflict(f"deployment {dep_id} is in use: {usage.pinned} in-flight invocation(s) pinned to it, "
                           f"{orphaned} waiting for its services; --force removes it anyway (they pause)")
        await asyncio.to_thread(self._write, dep_id, None)
        log.info("removed deployment %s (%s)", dep_id, dep.uri)
        return Removed(dep_id, usage)


def _summary(dep: Deployment, newest: dict[str, Deployment]) -> dict[str, Any]:
    return {"id": dep.id, "uri": dep.uri, "registered_at_ms": dep.registered_at_ms,
            "services": [{"name": s["name"], "keyed": s["keyed"], "handlers": [h["name"] for h in s["handlers"]]}
                         for s in dep.manifest["services"]],
            "newest_for": sorted(s for s, d in newest.items() if d.id == dep.id)}
