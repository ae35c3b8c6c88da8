"""The admin API (gateway/admin.py) over real HTTP and a real broker: every
bad input is a JSON `{message}` 4xx (table-driven), the token is checked,
services and the OpenAPI document are served, a non-loopback address
without a token refuses to start, and with no processor a describe is a
503 with Retry-After, never a hang."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from oncely.shuffle.ids import format_id, random_id
from support import oncely_cli
from test_controls import AUTH, SPEC, TOKEN, Http, Served, free_port

_UNKNOWN = f"{format_id(random_id())}_0"

BAD_INPUT: list[tuple[str, str, dict[str, str], int, str]] = [
    # method, path, headers, status, message part
    ("GET", "/services", {}, 401, "missing bearer token"),
    ("GET", "/services", {"Authorization": "Bearer nope"}, 401, "wrong bearer token"),
    ("GET", "/services", {"Authorization": TOKEN}, 401, "missing bearer token"),
    ("PATCH", f"/invocations/{_UNKNOWN}/kill", {}, 401, "missing bearer token"),
    ("GET", "/openapi.json", {"Authorization": "Bearer " + TOKEN + "x"}, 401, "wrong bearer token"),
    ("GET", "/invocations/not-an-id", AUTH, 400, "invocation id"),
    ("GET", "/invocations/inv_%FF", AUTH, 400, "not UTF-8"),
    ("GET", "/invocations/inv_zz%", AUTH, 400, "malformed percent-encoding"),
    ("GET", f"/invocations/{_UNKNOWN[:-2]}_99", AUTH, 404, "has no log partition 99"),
    ("GET", f"/invocations/{_UNKNOWN}", AUTH, 404, "is unknown"),
    ("PATCH", f"/invocations/{_UNKNOWN}/cancel", AUTH, 404, "is unknown"),
    ("PATCH", "/invocations/nope/pause", AUTH, 400, "invocation id"),
    ("PATCH", f"/invocations/{_UNKNOWN}/explode", AUTH, 404, "no route"),
    ("GET", f"/invocations/{_UNKNOWN}/kill", AUTH, 405, "allowed: PATCH"),
    ("POST", "/services", AUTH, 405, "allowed: GET"),
    ("DELETE", "/health", {}, 405, "allowed: GET"),
    ("GET", "/services/nosuch", AUTH, 404, "has no service 'nosuch'"),
    ("GET", "/invocations?limit=0", AUTH, 400, "limit '0'"),
    ("GET", "/invocations?limit=x", AUTH, 400, "limit 'x'"),
    ("GET", "/invocations?phase=DONE", AUTH, 400, "unknown phase 'DONE'"),
    ("GET", "/invocations", {**AUTH, "x-oncely-wait": "soon"}, 400, "not a number"),
    ("GET", "/deployments", {}, 401, "missing bearer token"),
    ("GET", "/deployments/dp_nope", AUTH, 404, "no deployment dp_nope"),
    ("DELETE", "/deployments/dp_nope", AUTH, 404, "no deployment dp_nope"),
    ("DELETE", "/deployments/dp_nope?force=maybe", AUTH, 400, "force must be true or false"),
    ("PUT", "/deployments", AUTH, 405, "allowed: POST, GET"),
    ("POST", "/deployments", AUTH, 415, "application/json"),
    ("GET", "/", AUTH, 404, "no route"),
]


@pytest.fixture(scope="module")
def served(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(kafka, tmp_path_factory.mktemp("adm")).start()
    try:
        yield s
    finally:
        assert s.proc.stop() == 0, s.proc.log_text()[-3000:]


@pytest.mark.parametrize("method,path,headers,status,message", BAD_INPUT,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD_INPUT])
def test_bad_input_is_a_json_4xx(served: Served, method: str, path: str, headers: dict[str, str], status: int,
                                 message: str) -> None:
    got, h, body = served.admin(method, path, headers=headers)
    assert got == status, body
    assert h["content-type"].startswith("application/json")
    assert message in body["message"], body
    if status == 401:
        assert h["www-authenticate"] == "Bearer"
    if status == 405:
        assert "allow" in h


def test_services_health_version_and_the_openapi_document(served: Served) -> None:
    assert served.admin("GET", "/health")[0] == 200  # no token needed
    status, _, body = served.admin("GET", "/version", headers=AUTH)
    assert status == 200 and body["version"]
    status, _, body = served.admin("GET", "/services", headers=AUTH)
    assert status == 200
    assert {s["name"]: (s["keyed"], s["handlers"]) for s in body["services"]} == {
        "audit": (True, ["note"]), "payments": (True, ["charge"]), "trips": (True, ["book", "hold", "nap"])}
    assert served.admin("GET", "/services/trips", headers=AUTH)[2]["handlers"] == ["book", "hold", "nap"]
    status, _, doc = served.admin("GET", "/openapi.json", headers=AUTH)
    assert status == 200 and doc["openapi"] == "3.1.0"
    for path in ("/services", "/invocations", "/invocations/{invocation_id}", "/invocations/{invocation_id}/kill"):
        assert path in doc["paths"], sorted(doc["paths"])
    assert "patch" in doc["paths"]["/invocations/{invocation_id}/purge"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_describe_and_a_wrong_phase_409(served: Served) -> None:
    inv = served.send("/trips/erin/hold")
    assert served.http("GET", f"/restate/attach/{inv}")[2] == 1
    d = served.describe(inv)
    assert d["phase"] == "COMPLETED" and d["invocation_id"] == inv
    for action in ("cancel", "kill", "pause"):
        status, body = served.control(inv, action)
        assert status == 409 and "it has finished (COMPLETED)" in body["message"], body
    # A plain id (no partition) is found by asking every partition.
    plain = inv.rsplit("_", 1)[0]
    assert served.describe(plain)["invocation_id"] == inv


def test_deployments_register_list_describe_remove(served: Served, tmp_path: Path) -> None:
    from test_remote_deployments import EndpointProcess

    bad = [({"url": "http://x"}, 400, "non-empty string \"uri\""), ({"uri": 5}, 400, "non-empty string"),
           ({"uri": "http://127.0.0.1:9", "force": "yes"}, 400, "force must be true or false"),
           ({"uri": "http://127.0.0.1:9", "extra": 1}, 400, "unknown field(s) extra"),
           ({"uri": "ftp://nowhere"}, 400, "ftp://nowhere"),
           ({"uri": "http://127.0.0.1:9", "headers": {"X-A": "a\r\nb"}}, 400, "visible ASCII"),
           ({"uri": "http://127.0.0.1:9", "headers": {"Host": "x"}}, 400, "set by oncely itself"),
           ({"uri": f"http://127.0.0.1:{free_port()}"}, 502, "")]
    for body, status, message in bad:
        got, _, answer = served.admin("POST", "/deployments", body, headers=AUTH)
        assert (got, message in answer["message"]) == (status, True), (body, answer)
    ep = EndpointProcess("v1", tmp_path / "endpoint.log")
    try:
        status, _, reg = served.admin("POST", "/deployments", {"uri": ep.url}, headers=AUTH)
        assert status == 201 and reg["id"] == ep.id and reg["created"], reg
        assert served.admin("POST", "/deployments", {"uri": ep.url}, headers=AUTH)[0] == 200  # the same manifest
        status, _, listed = served.admin("GET", "/deployments", headers=AUTH)
        assert status == 200 and [d["id"] for d in listed["deployments"]] == [ep.id], listed
        status, _, one = served.admin("GET", f"/deployments/{ep.id}", headers=AUTH)
        assert status == 200 and one["uri"] == ep.url and one["pinned"] == 0, one
        status, _, gone = served.admin("DELETE", f"/deployments/{ep.id}", headers=AUTH)
        assert status == 202 and gone == {"id": ep.id, "pinned": 0, "pending": 0}, gone
        assert served.admin("GET", f"/deployments/{ep.id}", headers=AUTH)[0] == 404
        assert "/deployments/{deployment_id}" in served.admin("GET", "/openapi.json", headers=AUTH)[2]["paths"]
    finally:
        ep.kill()


def test_a_non_loopback_address_without_a_token_refuses_to_start(kafka: str) -> None:
    r = oncely_cli("run", SPEC, "--bootstrap", kafka, "--admin", "0.0.0.0:9", env={"ONCELY_ADMIN_TOKEN": ""})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: --admin 0.0.0.0:9: the admin API can kill and purge invocations, so on a non-loopback address it "
        "needs a bearer token (set ONCELY_ADMIN_TOKEN or --admin-token)")


def test_without_a_processor_describe_is_a_503_within_the_wait(kafka: str, served: Served,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    # A standalone admin API (oncely gateway --admin) of the same app, with its processor stopped;
    # its ingress (--http) asks for a token of its own.
    import subprocess
    import sys

    from support import REPO, wait_until

    port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("admgw") / "gw.log"
    env: dict[str, Any] = {"ONCELY_TEST_APP": served.app, "ONCELY_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    with open(log, "w") as out:
        gw = subprocess.Popen([sys.executable, "-m", "oncely.cli", "gateway", "--app", SPEC, "--admin",
                               f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http_port}", "--http-token", "in-tok",
                               "--bootstrap", kafka], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    admin = Http(port)
    try:
        def up() -> bool:
            try:
                return admin("GET", "/health", timeout=5)[0] == 200
            except OSError:
                return False
        wait_until(up, 60, 0.2, "the standalone admin API")
        ingress = Http(http_port)
        assert ingress("GET", "/restate/health")[0] == 200  # no token needed
        for headers, message in (({}, "missing bearer token"), ({"Authorization": "Bearer " + TOKEN}, "wrong"),
                                 ({"Authorization": "in-tok"}, "missing bearer token")):
            status, h, body = ingress("POST", "/trips/erin/hold/send", headers=headers)
            assert (status, message in body["message"], h.get("www-authenticate")) == (401, True, "Bearer"), body
            assert ingress("GET", "/openapi.json", headers=headers)[0] == 401
        status, _, body = ingress("POST", "/trips/erin/hold/send", headers={"Authorization": "Bearer in-tok"})
        assert status == 202 and body["status"] == "accepted", body
        assert served.proc.stop() == 0
        started = time.monotonic()
        status, h, body = admin("GET", f"/invocations/{_UNKNOWN}", headers={**AUTH, "x-oncely-wait": "1"})
        assert status == 503 and "processors running" in body["message"] and h["retry-after"] == "5", body
        assert time.monotonic() - started < 10
        status, _, body = admin("PATCH", f"/invocations/{_UNKNOWN}/kill", headers={**AUTH, "x-oncely-wait": "1"})
        assert status == 202 and body["status"] == "pending", body
    finally:
        gw.terminate()
        gw.wait(30)
        served.start()
