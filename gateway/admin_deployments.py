"""The admin API's /deployments routes: register, list, describe and remove
remote deployments through `remote.deployments.DeploymentAdmin`, the same
library `oncely deployments` uses. Its errors carry their HTTP status
(400 bad manifest or URI, 404, 409 breaking change / in use, 502 discovery
failed, 504 discovery timeout), so each answer here is one mapping.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from oncely.gateway import paths
from oncely.gateway.handlers import json_response
from oncely.gateway.paths import HttpError
from oncely.gateway.routes import Route

if TYPE_CHECKING:
    from oncely.app import App
    from oncely.remote.deployments import DeploymentAdmin

_AUTH = {401: "missing or wrong bearer token"}
_REG = {201: "registered: `{id, uri, services, created, replaced, dry_run, warnings}`",
        200: "the same manifest is registered already (or a dry run that would not change it)",
        400: "bad body, URI or manifest", 409: "a breaking change or an in-process service (send force)",
        502: "discovery failed: endpoint unreachable or not answering 200", 504: "discovery timed out", **_AUTH}

DEPLOYMENT_ROUTES: tuple[Route, ...] = (
    Route("POST", "/deployments", "register_deployment", "Register a remote deployment: discover URI's services "
          "and handlers; body `{uri, headers?, force?, dry_run?}`", _REG, body=("application/json",),
          tag="deployments"),
    Route("GET", "/deployments", "list_deployments", "Registered deployments, oldest first",
          {200: "`{deployments: [{id, uri, registered_at_ms, services, newest_for}]}`", **_AUTH}, tag="deployments"),
    Route("GET", "/deployments/{deployment_id}", "describe_deployment", "One deployment: manifest, header names, "
          "pinned and pending in-flight invocations (read from the changelog)",
          {200: "`{id, uri, services, manifest, pinned, pending, ...}`", 404: "no such deployment", **_AUTH},
          tag="deployments"),
    Route("DELETE", "/deployments/{deployment_id}", "remove_deployment", "Remove a deployment; refused while "
          "invocations are pinned to it unless ?force=true (they pause)",
          {202: "`{id, pinned, pending}`: removed; processors follow", 404: "no such deployment",
           409: "in use (send ?force=true)", **_AUTH}, query=("force",), tag="deployments"),
)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")
_RESERVED = {"host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
             "accept", "accept-encoding"}


def _flag(value: Any, what: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise HttpError(400, f"{what} must be true or false, not {value!r}")


class DeploymentRoutes:
    """What each /deployments route does; mixed into the admin's `Admin`."""

    app: "App"
    _deployments: "DeploymentAdmin | None" = None

    def _registry(self) -> "DeploymentAdmin":
        if self._deployments is None:
            from oncely.remote.deployments import DeploymentAdmin

            self._deployments = DeploymentAdmin.for_app(self.app)
        return self._deployments

    async def _call(self, op: Any) -> Any:
        from confluent_kafka import KafkaException

        from oncely.errors import ConfigError
        from oncely.remote.registry import DeploymentError

        try:
            return await op
        except DeploymentError as e:
            raise HttpError(e.status, str(e)) from None
        except (ConfigError, KafkaException) as e:  # the deployments topic cannot be read or written now
            raise HttpError(503, f"deployments of app {self.app.name!r}: {e}", {"Retry-After": "5"}) from None

    async def register_deployment(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        if request.content_type != "application/json":
            raise HttpError(415, "send the registration as application/json: {\"uri\": \"http://…\"}")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("uri"), str) or not body["uri"]:
            raise HttpError(400, "the body must be an object with a non-empty string \"uri\"")
        unknown = set(body) - {"uri", "headers", "force", "dry_run"}
        if unknown:
            raise HttpError(400, f"unknown field(s) {', '.join(sorted(unknown))}; allowed: uri, headers, force, "
                                 "dry_run")
        headers = body.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in headers.items()):
            raise HttpError(400, "headers must be an object of strings")
        for name, value in headers.items():
            if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
                raise HttpError(400, f"header {name!r}: a name must be a token and a value visible ASCII or spaces")
            if name.lower() in _RESERVED or name.lower().startswith("x-oncely-"):
                raise HttpError(400, f"header {name!r} is set by oncely itself on every request")
        reg = await self._call(self._registry().register(body["uri"], force=_flag(body.get("force"), "force"),
                                                         dry_run=_flag(body.get("dry_run"), "dry_run"),
                                                         headers=headers or None))
        return json_response(201 if reg.created and not reg.dry_run else 200, asdict(reg))

    async def list_deployments(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        return json_response(200, {"deployments": await self._call(self._registry().list())})

    async def describe_deployment(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        dep_id = paths.text(p["deployment_id"], "deployment id")
        return json_response(200, await self._call(self._registry().describe(dep_id)))

    async def remove_deployment(self, request: web.Request, p: dict[str, bytes]) -> web.Response:
        dep_id = paths.text(p["deployment_id"], "deployment id")
        removed = await self._call(self._registry().remove(dep_id, force=_flag(request.query.get("force"),
                                                                                 "force")))
        return json_response(202, {"id": removed.id, "pinned": removed.usage.pinned,
                                   "pending": removed.usage.pending})
