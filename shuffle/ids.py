"""Invocation ids: 16 bytes, derived deterministically whenever a duplicate of
the same logical request could arrive, so the duplicate is recognised.

- idempotency key given: hash(service, handler, key, idempotency key);
- a source record: hash(topic, partition, offset, target) (ingest);
- a call/send from a handler: hash(caller id, journal index) (shuffle);
- otherwise random.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct

ID_LEN = 16
_PREFIX = "inv_"


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _digest(*parts: bytes) -> bytes:
    """BLAKE2b-128 of the parts, each framed by its 4-byte length."""
    return hashlib.blake2b(_framed(*parts), digest_size=ID_LEN).digest()


def random_id() -> bytes:
    return os.urandom(ID_LEN)


def idempotent_id(service: str, handler: str, key: bytes | None, idempotency_key: str) -> bytes:
    return _digest(b"idem", service.encode(), handler.encode(), key or b"", idempotency_key.encode())


def source_record_id(topic: str, partition: int, offset: int, target: str) -> bytes:
    """One source record feeding several subscriptions makes one invocation
    each. (The `_digest` of b"src", topic, partition, offset and target: the
    hash of the constant head is made once per topic and target and copied,
    half the cost of hashing it again for every record.)"""
    head, tail = _source_frames(topic, target)
    h = head.copy()
    h.update(_PARTITION_OFFSET.pack(4, partition, 8, offset) + tail)
    return h.digest()


_PARTITION_OFFSET = struct.Struct(">IIIQ")  # length 4, partition, length 8, offset


@functools.lru_cache(maxsize=1024)
def _source_frames(topic: str, target: str) -> tuple["hashlib._Hash", bytes]:
    return hashlib.blake2b(_framed(b"src", topic.encode()), digest_size=ID_LEN), _framed(target.encode())


def child_id(caller: bytes, journal_index: int) -> bytes:
    return _digest(b"child", caller, journal_index.to_bytes(4, "big"))


def format_id(inv_id: bytes) -> str:
    """Printable form, e.g. `inv_mfrggzdfmztwq2lknnwg23tpoa`."""
    return _PREFIX + base64.b32encode(inv_id).decode().rstrip("=").lower()


def parse_id(text: str) -> bytes:
    """Inverse of `format_id`; raises ValueError with a readable message."""
    if not text.startswith(_PREFIX):
        raise ValueError(f"invocation id {text!r} does not start with {_PREFIX!r}")
    body = text[len(_PREFIX):].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except Exception:
        raise ValueError(f"invocation id {text!r} is not valid base32") from None
    if len(raw) != ID_LEN:
        raise ValueError(f"invocation id {text!r} does not hold {ID_LEN} bytes")
    return raw


_AWK_PREFIX = "awk_"


def format_awakeable(app: str, partition: int, inv_id: bytes, index: int) -> str:
    """An awakeable id says where its waiting invocation lives, so a resolver
    needs nothing but the id: app, log partition, invocation, journal index."""
    name = app.encode()
    raw = bytes([len(name)]) + name + partition.to_bytes(2, "big") + inv_id + index.to_bytes(4, "big")
    return _AWK_PREFIX + base64.b32encode(raw).decode().rstrip("=").lower()


def parse_awakeable(text: str) -> tuple[str, int, bytes, int]:
    """Inverse of `format_awakeable`; raises ValueError with a readable message."""
    if not isinstance(text, str) or not text.startswith(_AWK_PREFIX):
        raise ValueError(f"awakeable id {text!r} does not start with {_AWK_PREFIX!r}")
    body = text[len(_AWK_PREFIX):].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
        n = raw[0]
        app = raw[1:1 + n].decode()
        rest = raw[1 + n:]
    except Exception:
        raise ValueError(f"awakeable id {text!r} is malformed") from None
    if len(rest) != 2 + ID_LEN + 4:
        raise ValueError(f"awakeable id {text!r} is malformed")
    return app, int.from_bytes(rest[:2], "big"), rest[2:2 + ID_LEN], int.from_bytes(rest[2 + ID_LEN:], "big")
