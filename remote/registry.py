"""Deployments: the endpoints a processor runs remote handlers on.

Discovery (`GET …/discover`, signed when a signing key is configured) and
the manifest's checks (it is untrusted input); `register` adds a manifest's
services to an app as remote services, so routing, key locks and retry
policies work as for in-process ones (a service the app defines itself
stays in-process). Registrations themselves live in `<app>.deployments`
(remote/deployments.py). The errors carry the HTTP status an admin API
answers with.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from oncely.errors import ConfigError
from oncely.remote.signing import SigningKey, load_signing_key, sign_request
from oncely.remote.wire import MANIFEST_MEDIA_TYPE, PROTOCOL_MAX, PROTOCOL_MIN, read_capped

if TYPE_CHECKING:
    import aiohttp

    from oncely.app import App, RetryPolicy

log = logging.getLogger("oncely.remote")

MAX_MANIFEST_BYTES = 1024 * 1024
DISCOVER_TIMEOUT_S = 10.0


class DeploymentError(ConfigError):
    """A deployment operation refused; `status` is its HTTP answer."""
    status = 400


class BadManifest(DeploymentError):
    """The endpoint answered, but not with a usable manifest (or no common protocol)."""
    status = 400


class NotFound(DeploymentError):
    """No deployment with that id is registered."""
    status = 404


class Conflict(DeploymentError):
    """Refused unless forced: a breaking change, a service defined in-process,
    or a removal while invocations are pinned to the deployment."""
    status = 409


class DiscoveryFailed(DeploymentError):
    """The endpoint could not be reached or did not answer 200."""
    status = 502


class DiscoveryTimeout(DiscoveryFailed):
    """The endpoint did not answer the discovery within its time."""
    status = 504


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
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    registered_at_ms: int = 0
    raw: bytes = b""  # the manifest as the endpoint sent it

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.manifest["services"]}

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
    for s in services:
        for h in s["handlers"]:
            if not isinstance(h.get("takes_input", True), bool):
                raise ValueError(f"handler {s['name']}.{h['name']}: takes_input must be a bool")
    names = [s["name"] for s in services]
    if len(set(names)) != len(names):
        raise ValueError("the manifest names a service twice")
    return Deployment(deployment_id(uri), uri, doc, _int(doc, "max_batch", 32),
                      _int(doc, "max_request_bytes", 8 * 1024 * 1024),
                      _int(doc, "max_response_bytes", 8 * 1024 * 1024), raw=body)


async def discover(session: aiohttp.ClientSession, uri: str, key: SigningKey | None,
                   extra_headers: dict[str, str] | None = None) -> Deployment:
    """`GET {uri}/discover`, checked: DiscoveryFailed (unreachable, not
    200), DiscoveryTimeout, BadManifest; DeploymentError for a bad URI."""
    import aiohttp

    try:
        _check_uri(uri)
    except ConfigError as e:
        raise DeploymentError(str(e)) from None
    dp = deployment_id(uri)
    headers = {**(extra_headers or {}), "accept": MANIFEST_MEDIA_TYPE, "x-oncely-deployment": dp}
    url = f"{uri.rstrip('/')}/discover"
    if key is not None:
        headers.update(sign_request(key, "GET", urlsplit(url).path, b"", dp))
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=DISCOVER_TIMEOUT_S)) as resp:
            body = await read_capped(resp, MAX_MANIFEST_BYTES + 1)
            if resp.status != 200:
                raise DiscoveryFailed(f"deployment {uri}: discovery answered {resp.status}: "
                                      f"{body[:300].decode('utf-8', 'replace')}")
    except TimeoutError:
        raise DiscoveryTimeout(f"deployment {uri}: discovery timed out after {DISCOVER_TIMEOUT_S:.0f} s") from None
    except (aiohttp.ClientError, OSError) as e:
        raise DiscoveryFailed(f"deployment {uri}: unreachable: {type(e).__name__}: {e}") from None
    if len(body) > MAX_MANIFEST_BYTES:
        raise BadManifest(f"deployment {uri}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        dep = parse_manifest(uri, body)
    except ValueError as e:  # orjson.JSONDecodeError is one
        raise BadManifest(f"deployment {uri}: bad manifest: {e}") from None
    dep.headers = dict(extra_headers or {})
    return dep


def service_specs(dep: Deployment, default_retry: RetryPolicy) -> list[tuple[str, bool, RetryPolicy, dict[str, bool]]]:
    """(name, keyed, retry policy, {handler: takes_input}) of each service
    the manifest names; BadManifest when a name or retry policy is invalid."""
    from oncely.app import _NAME, RetryPolicy

    out = []
    for s in dep.manifest["services"]:
        r = s.get("retry")
        try:
            retry = default_retry if not isinstance(r, dict) else RetryPolicy(
                int(r["max_attempts"]), float(r["initial_interval"]), float(r["factor"]), float(r["max_interval"]))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise BadManifest(f"deployment {dep.uri}: service {s['name']!r} has a bad retry policy: {e}") from None
        bad = [n for n in [s["name"], *(h["name"] for h in s["handlers"])] if not _NAME.match(n)]
        if bad:
            raise BadManifest(f"deployment {dep.uri}: names {bad} may use only letters, digits, '_' and '-'")
        out.append((s["name"], s["keyed"], retry, {h["name"]: bool(h.get("takes_input", True)) for h in s["handlers"]}))
    return out


def register(app: App, dep: Deployment) -> list[str]:
    """Add the deployment's services to `app` (those it does not define
    itself); returns the names of the services that now run remote."""
    remote = []
    for name, keyed, retry, handlers in service_specs(dep, app.default_retry):
        if app.add_remote_service(name, keyed, retry, handlers, dep.id) is not None:
            remote.append(name)
    return remote
