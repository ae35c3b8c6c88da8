"""Resolving a send/call target: a handler reference or service/handler names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import orjson


@dataclass(frozen=True)
class Target:
    service: str
    handler: str
    key: bytes | None
    payload: bytes
    payload_format: str


def encode_payload(payload: Any) -> tuple[bytes, str]:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), "BYTES"
    return orjson.dumps(payload), "JSON"


@runtime_checkable
class HandlerRef(Protocol):
    """A registered handler (oncely.app.Handler), as a target names it."""

    name: str
    service: Any  # a Service: .name, .keyed


def key_bytes(key: Any) -> bytes | None:
    """A key: bytes as is, str as UTF-8, ints as their decimal text."""
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode()
    raise TypeError(f"a key must be str, bytes or int, not {type(key).__name__}")


def resolve(target: Any, args: tuple, services: dict[str, Any] | None = None) -> Target:
    """`(handler, key, payload)` for keyed services, `(handler, payload)` for
    stateless ones, or by name `("service", key, "handler", payload)` (key
    None for a stateless service)."""
    if isinstance(target, HandlerRef):
        service, handler = target.service.name, target.name
        if target.service.keyed:
            if not args:
                raise TypeError(f"{service} is keyed: give (handler, key, payload)")
            key, payload = args[0], (args[1] if len(args) > 1 else None)
            if key is None:
                raise TypeError(f"{service} is keyed: the key must not be None")
        else:
            key, payload = None, (args[0] if args else None)
    elif isinstance(target, str):
        if len(args) < 2:
            raise TypeError('by name: ("service", key, "handler", payload)')
        service, key, handler, payload = target, args[0], args[1], (args[2] if len(args) > 2 else None)
        svc = services.get(service) if services is not None else None
        if svc is not None and svc.keyed and key is None:
            raise TypeError(f"{service} is keyed: the key must not be None")
    else:
        raise TypeError(f"a target is a handler (e.g. counter.add) or a service name, not {type(target).__name__}")
    body, fmt = encode_payload(payload)
    return Target(service, handler, key_bytes(key), body, fmt)
