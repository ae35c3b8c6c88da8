"""Deployments: the endpoints a processor runs remote handlers on.

At start the processor asks each configured endpoint (`App(deployments=[…])`
or ONCELY_DEPLOYMENTS) for its manifest (`GET …/discover`, signed when a
signing key is configured) and adds the services it names to the app as
remote services, so routing, key locks and retry policies work as for
in-process ones. A service the app defines itself stays in-process.

Registrations are not yet kept in a compacted topic (`oncely deployments`):
every processor discovers its endpoints itself, and refuses to start when
one cannot be reached (its invocations would otherwise dead-letter as
unknown handlers).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from oncely.errors import ConfigError
from oncely.remote.signing import SigningKey, load_signing_key, sign_request
from oncely.remote.wire import MANIFEST_MEDIA_TYPE, PROTOCOL_MAX, PROTOCOL_MIN

if TYPE_CHECKING:
    import aiohttp

    from oncely.app import App

log = logging.getLogger("oncely.remote")

MAX_MANIFEST_BYTES = 1024 * 1024
DISCOVER_TIMEOUT_S = 10.0


def deployment_id(uri: str) -> str:
    """`dp_` + base32 of a hash of the normalised URI: registering a URI
    again gives the same id."""
    digest = hashlib.blake2b(uri.rstrip("/").encode(), digest_size=10).digest()
    return "dp_" + base64.b32encode(digest).decode().lower().rstrip("=")


@dataclass(slots=True)
class Deployment:
    """A registered endpoint and what its manifest says."""

    id: str
    uri: str
    manifest: dict[str, Any]
    max_batch: int
    max_request_bytes: int
    max_response_bytes: int

    def url(self, route: str) -> str:
        return f"{self.uri.rstrip('/')}/{route}"


def signing_key_from_env(env: dict[str, str] | None = None) -> SigningKey | None:
    """The processor's signing key: an ed25519 PEM (ONCELY_SIGNING_KEY_FILE)
    or an HMAC secret (the first of ONCELY_SIGNING_SECRET); None: unsigned."""
    env = dict(os.environ) if env is None else env
    path = env.get("ONCELY_SIGNING_KEY_FILE", "").strip()
    if path:
        return load_signing_key(Path(path))
    secrets = [s.strip() for s in env.get("ONCELY_SIGNING_SECRET", "").split(",") if s.strip()]
    return SigningKey.hmac(secrets[0]) if secrets else None


def _check_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"deployment {uri!r}: give an http(s) URL of an endpoint")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        log.warning("deployment %s is plain http: responses are not signed, use https beyond loopback", uri)


def _int(doc: dict[str, Any], name: str, default: int) -> int:
    value = doc.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int")
    return value


def parse_manifest(uri: str, body: bytes) -> Deployment:
    """A manifest, checked (it is untrusted input): ValueError says why not."""
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("the manifest is not an object")
    proto = doc.get("protocol")
    if not isinstance(proto, dict) or not isinstance(proto.get("min"), int) or not isinstance(proto.get("max"), int):
        raise ValueError("the manifest has no protocol range")
    if proto["min"] > PROTOCOL_MAX or proto["max"] < PROTOCOL_MIN:
        raise ValueError(f"the endpoint speaks protocol {proto['min']}..{proto['max']}, "
                         f"this processor {PROTOCOL_MIN}..{PROTOCOL_MAX}")
    services = doc.get("services")
    if not isinstance(services, list):
        raise ValueError("the manifest lists no services")
    for s in services:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("keyed"), bool)
                and isinstance(s.get("handlers"), list)
                and all(isinstance(h, dict) and isinstance(h.get("name"), str) for h in s["handlers"])):
            raise ValueError(f"a service entry of the manifest is malformed: {str(s)[:200]}")
    return Deployment(deployment_id(uri), uri, doc, _int(doc, "max_batch", 32),
                      _int(doc, "max_request_bytes", 8 * 1024 * 1024),
                      _int(doc, "max_response_bytes", 8 * 1024 * 1024))


async def discover(session: aiohttp.ClientSession, uri: str, key: SigningKey | None) -> Deployment:
    """`GET {uri}/discover`, checked; ConfigError when it fails."""
    import aiohttp

    _check_uri(uri)
    dp = deployment_id(uri)
    headers = {"accept": MANIFEST_MEDIA_TYPE, "x-oncely-deployment": dp}
    url = f"{uri.rstrip('/')}/discover"
    if key is not None:
        headers.update(sign_request(key, "GET", urlsplit(url).path, b"", dp))
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=DISCOVER_TIMEOUT_S)) as resp:
            body = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            if resp.status != 200:
                raise ConfigError(f"deployment {uri}: discovery answered {resp.status}: {body[:300]!r}")
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ConfigError(f"deployment {uri}: discovery failed: {type(e).__name__}: {e}") from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"deployment {uri}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return parse_manifest(uri, body)
    except ValueError as e:
        raise ConfigError(f"deployment {uri}: bad manifest: {e}") from None


def register(app: App, dep: Deployment) -> list[str]:
    """Add the deployment's services to `app` (those it does not define
    itself); returns the names of the services that now run remote."""
    from oncely.app import RetryPolicy

    remote = []
    for s in dep.manifest["services"]:
        r = s.get("retry")
        try:
            retry = app.default_retry if not isinstance(r, dict) else RetryPolicy(
                int(r["max_attempts"]), float(r["initial_interval"]), float(r["factor"]), float(r["max_interval"]))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"deployment {dep.uri}: service {s['name']!r} has a bad retry policy: {e}") from None
        handlers = {h["name"]: bool(h.get("takes_input", True)) for h in s["handlers"]}
        if app.add_remote_service(s["name"], s["keyed"], retry, handlers, dep.id) is not None:
            remote.append(s["name"])
    return remote


async def register_all(app: App, key: SigningKey | None) -> dict[str, Deployment]:
    """Discover and register every deployment the app names; by id."""
    import aiohttp

    found: dict[str, Deployment] = {}
    if not app.deployments:
        return found
    async with aiohttp.ClientSession() as session:
        for uri in app.deployments:
            dep = await discover(session, uri, key)
            services = register(app, dep)
            found[dep.id] = app.remote_deployments[dep.id] = dep
            log.info("deployment %s (%s): remote services %s", dep.id, uri, ", ".join(services) or "(none)")
    return found
