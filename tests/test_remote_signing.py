"""Request signing: an endpoint with keys refuses unsigned, expired,
wrong-key and tampered requests with 401 before it parses anything, for
both schemes (ed25519 and HMAC-SHA256), over real HTTP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from apps.remote_client import EndpointProcess, http, item

from oncely.errors import ConfigError
from oncely.remote import SigningKey, generate_signing_key, load_signing_key, parse_public_key, sign_request
from oncely.remote.signing import H_DEPLOYMENT, H_SCHEME, H_SIGNATURE, Verifier, normalise_path
from oncely.remote.wire import INVOKE_MEDIA_TYPE, invoke_request
from oncely.shuffle.ids import random_id

SECRET = "s3cret-s3cret-s3cret-0123456789"
KEY = load_signing_key(generate_signing_key())
DEPLOYMENT = "dp_test"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProcess]:
    other = load_signing_key(generate_signing_key())  # a second key: rotation
    env = {"ONCELY_VERIFY_KEYS": f"{other.public_key_text()},{KEY.public_key_text()}",
           "ONCELY_SIGNING_SECRET": SECRET}
    server = EndpointProcess(tmp_path_factory.mktemp("signed") / "endpoint.log", env)
    yield server
    server.stop()


def body() -> bytes:
    return invoke_request("remote-test", 0, [item(random_id(), "audit", "record", None, {"n": 1})])


def post(base: str, data: bytes, headers: dict[str, str], path: str = "/invoke") -> tuple[int, Any]:
    status, _, out = http("POST", base + path, data, {"content-type": INVOKE_MEDIA_TYPE, **headers})
    return status, orjson.loads(out)


@pytest.mark.parametrize("scheme", ["ed25519", "hmac"])
def test_signed_requests_pass_and_bad_ones_get_401(signed: EndpointProcess, scheme: str) -> None:
    key = KEY if scheme == "ed25519" else SigningKey.hmac(SECRET)
    wrong = load_signing_key(generate_signing_key()) if scheme == "ed25519" else SigningKey.hmac(SECRET + "x")
    base = signed.base
    good = body()
    tampered = good.replace(b'"partition":0', b'"partition":1')
    assert tampered != good

    def sign(data: bytes = good, k: SigningKey = key, path: str = "/invoke", **kw: Any) -> dict[str, str]:
        return sign_request(k, "POST", path, data, DEPLOYMENT, **kw)

    status, doc = post(base, good, sign())
    assert status == 200 and doc["items"][0]["status"] == "completed"
    # A gateway prefix does not change what is signed.
    assert post(base, good, sign(path="/invoke"), path="/stage/prod/invoke")[0] == 200
    now = int(time.time() * 1000)
    forged = {**sign(), H_SIGNATURE: sign(k=wrong)[H_SIGNATURE]}
    cases = {
        "unsigned": (good, {}),
        "expired": (good, sign(timestamp_ms=now - 61_000)),
        "future": (good, sign(timestamp_ms=now + 61_000)),
        "wrong key": (good, sign(k=wrong)),
        "forged with a known key id": (good, forged),
        "tampered body": (tampered, sign()),
        "tampered body and digest": (tampered,
                                     {**sign(), "x-oncely-content-sha256": sign(tampered)[
                                         "x-oncely-content-sha256"]}),
        "other route": (good, sign(path="/discover")),
        "other deployment": (good, {**sign(), H_DEPLOYMENT: "dp_other"}),
        "unknown scheme": (good, {**sign(), H_SCHEME: "rsa-v1"}),
        "garbage, unsigned": (b"{not json", {}),
    }
    want = {"unsigned": "unsigned", "expired": "expired", "future": "expired", "wrong key": "key",
            "forged with a known key id": "signature", "tampered body": "digest",
            "tampered body and digest": "signature", "other route": "signature", "other deployment": "signature",
            "unknown scheme": "scheme", "garbage, unsigned": "unsigned"}
    for name, (data, headers) in cases.items():
        status, doc = post(base, data, headers)
        assert (status, doc) == (401, {"message": want[name]}), name
    # Authenticated first, then checked: a signed request of another media type is a 415.
    status, _, _ = http("POST", base + "/invoke", good, {**sign(), "content-type": "application/json"})
    assert status == 415
    # discover is signed too; health is not.
    discover = sign_request(key, "GET", "/discover", b"", DEPLOYMENT)
    assert http("GET", base + "/discover", headers=discover)[0] == 200
    assert http("GET", base + "/discover")[0] == 401
    assert http("GET", base + "/health")[0] == 200


def test_an_endpoint_without_keys_warns(tmp_path: Path) -> None:
    server = EndpointProcess(tmp_path / "endpoint.log")
    try:
        assert http("POST", server.base + "/invoke", body(), {"content-type": INVOKE_MEDIA_TYPE})[0] == 200
    finally:
        server.stop()
    assert "accepts UNSIGNED requests" in (tmp_path / "endpoint.log").read_text()


def test_key_helpers(tmp_path: Path) -> None:
    pem = generate_signing_key()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    (tmp_path / "key.pem").write_bytes(pem)
    a, b = load_signing_key(pem), load_signing_key(tmp_path / "key.pem")
    assert a.public_key_text() == b.public_key_text() and a.key_id == b.key_id
    assert a.public_key_text().startswith("oncelypk1_") and load_signing_key(str(tmp_path / "key.pem")).key_id == a.key_id
    parse_public_key(a.public_key_text())
    for bad in ("pk_abc", "oncelypk1_AAAA"):
        with pytest.raises(ConfigError):
            parse_public_key(bad)
    with pytest.raises(ConfigError):
        SigningKey.hmac("short")
    with pytest.raises(ConfigError):
        SigningKey.hmac(SECRET).public_key_text()
    with pytest.raises(ConfigError):
        load_signing_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    # In process: the verifier takes several keys (rotation) and binds the route.
    v = Verifier([a.public_key_text()], [SECRET])
    h = sign_request(a, "POST", "/x/invoke/", b"{}", "dp")
    assert v.check("POST", "/y/invoke", h, b"{}") is None
    assert v.check("POST", "/y/discover", h, b"{}") == "signature"
    assert normalise_path("/a/b/discover/?x=1") == "/discover" and normalise_path("/a/other") is None
    with pytest.raises(ValueError):
        sign_request(a, "POST", "/elsewhere", b"")
