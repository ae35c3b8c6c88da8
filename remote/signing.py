"""Request signing between a processor and its endpoints.

Two schemes: `ed25519-v1` (the endpoint holds only a public key; needs
`cryptography`, the `remote` extra) and `hmac-sha256-v1` (stdlib only, but
every holder of the secret can sign). The signed string binds a label, the
method, the normalised path suffix, the time, the deployment id and the
SHA-256 of the body as sent, so a captured request cannot be replayed with
another journal or state, nor outside a ±60 s window. The endpoint checks
everything here before it decompresses or parses a byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any, Mapping

from oncely.errors import ConfigError

LABEL = "oncely-v1"
ED25519 = "ed25519-v1"
HMAC = "hmac-sha256-v1"
H_SCHEME = "x-oncely-signature-scheme"
H_KEY_ID = "x-oncely-key-id"
H_TIMESTAMP = "x-oncely-timestamp"
H_SIGNATURE = "x-oncely-signature"
H_DIGEST = "x-oncely-content-sha256"
H_DEPLOYMENT = "x-oncely-deployment"
WINDOW_MS = 60_000
PUBLIC_PREFIX = "oncelypk1_"
ROUTES = ("invoke", "discover", "health")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def normalise_path(path: str) -> str | None:
    """The route a path ends in (`/invoke`, `/discover`, `/health`), whatever
    prefix a gateway adds; None for any other path."""
    last = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return f"/{last}" if last in ROUTES else None


def signed_string(method: str, route: str, timestamp_ms: int, deployment: str, digest_hex: str) -> bytes:
    return "\n".join((LABEL, method.upper(), route, str(timestamp_ms), deployment, digest_hex)).encode()


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("ed25519 signing needs the `cryptography` package: pip install 'oncely[remote]' "
                          "(or sign with an HMAC secret)") from None
    return ed25519


def _ed_key_id(raw_public: bytes) -> str:
    return "ed_" + _b64url(hashlib.sha256(raw_public).digest()[:9])


def _hmac_key_id(secret: bytes) -> str:
    return "hs_" + _b64url(hashlib.sha256(b"oncely-hmac-key-id\0" + secret).digest()[:9])


def _secret(secret: str | bytes) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < 16:
        raise ConfigError("an HMAC signing secret must be at least 16 bytes")
    return raw


class SigningKey:
    """The processor's key: an ed25519 private key or an HMAC secret."""

    def __init__(self, scheme: str, key_id: str, private: Any = None, secret: bytes | None = None) -> None:
        self.scheme = scheme
        self.key_id = key_id
        self._private = private
        self._secret = secret

    @classmethod
    def hmac(cls, secret: str | bytes) -> SigningKey:
        raw = _secret(secret)
        return cls(HMAC, _hmac_key_id(raw), secret=raw)

    @classmethod
    def ed25519(cls, private: Any) -> SigningKey:
        raw = public_raw(private)
        return cls(ED25519, _ed_key_id(raw), private=private)

    def sign(self, message: bytes) -> bytes:
        if self._secret is not None:
            return hmac.new(self._secret, message, hashlib.sha256).digest()
        return self._private.sign(message)  # type: ignore[no-any-return]

    def public_key_text(self) -> str:
        """`oncelypk1_<base64url>`: what an endpoint's `verify_keys` lists."""
        if self._private is None:
            raise ConfigError("an HMAC secret has no public key; endpoints are given the secret itself")
        return PUBLIC_PREFIX + _b64url(public_raw(self._private))


def public_raw(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw,  # type: ignore[no-any-return]
                                             serialization.PublicFormat.Raw)


def generate_signing_key() -> bytes:
    """A new ed25519 private key as PKCS#8 PEM (keep it with the processor,
    e.g. in the file ONCELY_SIGNING_KEY_FILE names)."""
    from cryptography.hazmat.primitives import serialization

    key = _crypto().Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[no-any-return]
                             serialization.NoEncryption())


def load_signing_key(pem: bytes | str | Path) -> SigningKey:
    """An ed25519 private key from PEM bytes or a file path."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = Path(pem).read_bytes() if isinstance(pem, Path) or (isinstance(pem, str) and "-----" not in pem) \
        else (pem.encode() if isinstance(pem, str) else pem)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"not a PEM private key: {e}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError("the signing key must be an ed25519 key")
    return SigningKey.ed25519(key)


def parse_public_key(text: str) -> Any:
    """An `oncelypk1_…` text → an Ed25519PublicKey."""
    ed25519 = _crypto()
    if not isinstance(text, str) or not text.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"a verify key looks like {PUBLIC_PREFIX}<base64url>, not {text!r}")
    try:
        raw = _unb64url(text[len(PUBLIC_PREFIX):])
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError(f"verify key {text!r} is not a valid ed25519 public key") from None


def sign_request(key: SigningKey, method: str, path: str, body: bytes, deployment: str = "",
                 timestamp_ms: int | None = None) -> dict[str, str]:
    """The headers that sign one request (`body` exactly as sent, after any
    content-encoding); the processor adds them to every request."""
    route = normalise_path(path)
    if route is None:
        raise ValueError(f"{path!r} is not an endpoint route ({', '.join(ROUTES)})")
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    digest = hashlib.sha256(body).hexdigest()
    signature = key.sign(signed_string(method, route, ts, deployment, digest))
    return {H_SCHEME: key.scheme, H_KEY_ID: key.key_id, H_TIMESTAMP: str(ts), H_SIGNATURE: _b64url(signature),
            H_DIGEST: digest, H_DEPLOYMENT: deployment}


class Verifier:
    """The endpoint's side: the keys it accepts, by key id (several for
    rotation)."""

    def __init__(self, verify_keys: list[Any] | None = None, hmac_secrets: list[str | bytes] | None = None) -> None:
        self._ed: dict[str, Any] = {}
        self._hmac: dict[str, bytes] = {}
        for k in verify_keys or []:
            public = parse_public_key(k) if isinstance(k, str) else k
            from cryptography.hazmat.primitives import serialization

            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self._ed[_ed_key_id(raw)] = public
        for s in hmac_secrets or []:
            raw_secret = _secret(s)
            self._hmac[_hmac_key_id(raw_secret)] = raw_secret

    @property
    def enabled(self) -> bool:
        return bool(self._ed or self._hmac)

    def check(self, method: str, path: str, headers: Mapping[str, str], body: bytes,
              now_ms: int | None = None) -> str | None:
        """None when the request is signed by a known key, else a one-word
        reason: unsigned, scheme, key, expired, digest or signature."""
        scheme = headers.get(H_SCHEME)
        signature = headers.get(H_SIGNATURE)
        if not scheme or not signature:
            return "unsigned"
        kid = headers.get(H_KEY_ID, "")
        if scheme == ED25519:
            public, secret = self._ed.get(kid), None
        elif scheme == HMAC:
            public, secret = None, self._hmac.get(kid)
        else:
            return "scheme"
        if public is None and secret is None:
            return "key"
        try:
            ts = int(headers.get(H_TIMESTAMP, ""))
        except ValueError:
            return "expired"
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if abs(now - ts) > WINDOW_MS:
            return "expired"
        digest = hashlib.sha256(body).hexdigest()
        if not hmac.compare_digest(headers.get(H_DIGEST, "").encode(), digest.encode()):
            return "digest"
        route = normalise_path(path) or path
        message = signed_string(method, route, ts, headers.get(H_DEPLOYMENT, ""), digest)
        try:
            sig = _unb64url(signature)
        except ValueError:
            return "signature"
        if secret is not None:
            ok = hmac.compare_digest(sig, hmac.new(secret, message, hashlib.sha256).digest())
        else:
            from cryptography.exceptions import InvalidSignature

            try:
                public.verify(sig, message)
                ok = True
            except InvalidSignature:
                ok = False
        return None if ok else "signature"
