"""The ingress's OpenAPI document, generated with apispec from the route
table (routes.py) and the app's own services, so it cannot drift from what
the dispatcher serves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncely import __version__
from oncely.errors import ConfigError
from oncely.gateway.routes import ROUTES, Route

if TYPE_CHECKING:
    from oncely.app import App

INSTALL = "pip install 'oncely[http]'"
_ERROR = {"type": "object", "required": ["message"],
          "properties": {"message": {"type": "string"}, "invocation_id": {"type": "string"}}}
_PARAMS = {
    "service": "service name", "handler": "handler name", "name": "state name",
    "key": "the key, percent-encoded (any bytes)", "invocation_id": "`inv_<id>_<partition>` (or a plain `inv_<id>`)",
    "idempotency_key": "the call's Idempotency-Key", "awakeable_id": "`awk_...`, as the handler handed it out",
}
_HEADERS = {
    "Idempotency-Key": "1-256 visible ASCII characters; a repeated call attaches to the first",
    "x-oncely-wait": "seconds to wait for the result (default 30, at most 300)",
}


def require_apispec() -> None:
    try:
        import apispec
    except ImportError:
        raise ConfigError(f"--http needs the apispec package: {INSTALL}") from None
    del apispec


def _operation(r: Route, i: int, summary: str | None = None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": p[1:-1], "in": "path", "required": True, "schema": {"type": "string"},
         "description": _PARAMS.get(p[1:-1], "")} for p in r.pattern if p.startswith("{")]
    params += [{"name": h, "in": "header", "schema": {"type": "string"}, "description": _HEADERS.get(h, "")}
               for h in r.headers]
    params += [{"name": q, "in": "query", "schema": {"type": "string"},
                "description": "start later: 10s, 500ms, 5m, 2h, 1d or ISO 8601 (PT10S)"} for q in r.query]
    responses: dict[str, Any] = {}
    for status, text in r.responses.items():
        resp: dict[str, Any] = {"description": text}
        if status >= 400 or status == 202:
            resp["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}
                                                    if status >= 400 else {"type": "object"}}}
        responses[str(status)] = resp
    op: dict[str, Any] = {"summary": summary or r.summary, "tags": [r.tag], "operationId": f"{r.op}_{i}",
                          "parameters": params, "responses": responses}
    if r.body:
        op["requestBody"] = {"required": False, "content": {ct: {"schema": {}} for ct in r.body}}
    return op


def document(app: "App") -> dict[str, Any]:
    """The OpenAPI 3.1 document of this app's ingress."""
    from apispec import APISpec

    spec = APISpec(title=f"oncely ingress of app {app.name!r}", version=__version__, openapi_version="3.1.0",
                   info={"description": "Call, send, attach, awakeables and state over HTTP (paths follow "
                                        "Restate's). Errors are JSON `{message}`."})
    spec.components.schema("Error", _ERROR)
    paths: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(ROUTES):
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r, i)
    # The app's own handlers, one concrete path each (`/{svc}/{key}/{handler}` filled in).
    call = next(r for r in ROUTES if r.op == "alias" and len(r.pattern) == 3)
    stateless = next(r for r in ROUTES if r.op == "alias" and len(r.pattern) == 2)
    for svc in sorted(app.services.values(), key=lambda s: s.name):
        for h in sorted(svc.handlers):
            path = f"/{svc.name}/{{key}}/{h}" if svc.keyed else f"/{svc.name}/{h}"
            base = call if svc.keyed else stateless
            op = _operation(base, len(paths), f"Call {svc.name}.{h} and wait for its output")
            op["parameters"] = [p for p in op["parameters"] if p["name"] not in ("service", "handler")]
            op["operationId"] = f"call_{svc.name}_{h}"
            op["tags"] = [svc.name]
            paths.setdefault(path, {})["post"] = op
    for path, ops in paths.items():
        spec.path(path=path, operations=ops)
    return spec.to_dict()
