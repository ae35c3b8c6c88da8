"""The HTTP ingress (oncely.gateway) over real HTTP and a real broker: the
processor runs `oncely run --http` in a subprocess (or beside a standalone
`oncely gateway`), and the tests are its users, through http.client."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote_from_bytes

import pytest

import oncely
from oncely.shuffle.ids import format_awakeable, format_id, idempotent_id, random_id
from oncely.shuffle.routing import partition_for
from oncely.testing import unique_name
from support import REPO, Http, ProcessorProcess, wait_until
from support import free_port as _port

SPEC = "tests.apps.gateway_app:app"
PARTITIONS = 4


class GatewayProcess:
    """`oncely gateway` in a subprocess."""

    def __init__(self, kafka: str, env: dict[str, str], port: int, log: Path) -> None:
        out = open(log, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oncely.cli", "gateway", "--app", SPEC, "--http", f"127.0.0.1:{port}",
             "--bootstrap", kafka], cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _env(app: str, **extra: str) -> dict[str, str]:
    return {"ONCELY_TEST_APP": app, "ONCELY_TEST_PARTITIONS": str(PARTITIONS), "ONCELY_COMMIT_INTERVAL": "0.05",
            **extra}


@pytest.fixture(scope="module")
def served(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Http]]:
    """One processor with --http for the tests that do not crash it."""
    tmp = tmp_path_factory.mktemp("gw")
    app, port = unique_name("gw"), _port()
    proc = ProcessorProcess(SPEC, kafka, tmp / "state", _env(app, ONCELY_HTTP=f"127.0.0.1:{port}"),
                            tmp / "p.log").start()
    client = Http(port)
    try:
        client.ready()
        yield app, client
    finally:
        assert proc.stop() == 0, proc.log_text()[-3000:]


def _awk_elsewhere() -> str:
    return format_awakeable("other-app", 0, random_id(), 1)


BAD_INPUT = [
    # method, path, headers, body, status, message part
    ("POST", "/counter/alice/nope", {}, 1, 404, "has no handler 'nope'"),
    ("POST", "/nosuch/hello", {}, 1, 404, "has no service 'nosuch'"),
    ("GET", "/counter/alice/add", {}, None, 405, "GET is not allowed here; allowed: POST"),
    ("DELETE", "/restate/health", {}, None, 405, "allowed: GET"),
    ("GET", "/", {}, None, 404, "no route"),
    ("GET", "/restate/nothing/here", {}, None, 404, "no route"),
    ("POST", "/counter/alice/add", {"Content-Type": "application/json"}, b"{bad", 400, "not valid JSON"),
    ("POST", "/counter/alice/add", {"Content-Type": "text/plain"}, b"1", 415, "not supported"),
    ("POST", "/counter/alice/add", {"Content-Type": "application/json"}, b"1" * (901 * 1024), 413, "limit"),
    ("POST", "/counter/al%ZZice/add", {}, 1, 400, "malformed percent-encoding"),
    ("POST", "/counter/al%2/add", {}, 1, 400, "malformed percent-encoding"),
    ("POST", "/counter//add", {}, 1, 400, "empty path segment"),
    ("POST", "/counter/add", {}, 1, 400, "is keyed"),
    ("POST", "/restate/call/counter/add", {}, 1, 400, "is keyed"),
    ("POST", "/greeter/bob/hello", {}, "x", 400, "is stateless"),
    ("POST", "/%FF%FE/x", {}, 1, 400, "service in the path is not UTF-8"),
    ("POST", "/counter/alice/add", {"Idempotency-Key": "k" * 257}, 1, 400, "1 to 256 bytes"),
    ("POST", "/counter/alice/add", {"Idempotency-Key": "has space"}, 1, 400, "visible ASCII"),
    ("POST", "/counter/alice/add", {"Idempotency-Key": "caf\u00e9".encode().decode("latin-1")}, 1, 400,
     "visible ASCII"),
    ("POST", "/counter/alice/add?delay=10s", {}, 1, 400, "delay is only for one-way sends"),
    ("POST", "/restate/call/counter/alice/add?delay=PT1S", {}, 1, 400, "delay is only for one-way sends"),
    ("POST", "/counter/alice/add/send?delay=soon", {}, 1, 400, "delay 'soon'"),
    ("POST", "/counter/alice/add/send?delay=PT", {}, 1, 400, "delay 'PT'"),
    ("POST", "/counter/alice/add/send?delay=400d", {}, 1, 400, "longer than 365 days"),
    ("POST", "/counter/alice/add", {"x-oncely-wait": "301"}, 1, 400, "between 0 and 300"),
    ("POST", "/counter/alice/add", {"x-oncely-wait": "soon"}, 1, 400, "not a number"),
    ("GET", "/restate/attach/nope", {}, None, 400, "does not start with 'inv_'"),
    ("GET", "/restate/attach/inv_0000", {}, None, 400, "not valid base32"),
    ("GET", "/restate/output/inv_aaaa", {}, None, 400, "does not hold 16 bytes"),
    ("GET", f"/restate/output/{format_id(bytes(16))}_99", {}, None, 404, "has no log partition 99"),
    ("GET", "/restate/invocation/counter/alice/add/has%20space/attach", {}, None, 400, "visible ASCII"),
    ("POST", "/restate/awakeables/awk_nonsense/resolve", {}, 1, 400, "malformed"),
    ("POST", "/restate/awakeables/nope/reject", {}, b"r", 400, "does not start with 'awk_'"),
    ("POST", "/restate/awakeables/AWK/resolve", {"Content-Type": "application/json"}, b"{", 400, "not valid JSON"),
    ("POST", f"/restate/awakeables/{_awk_elsewhere()}/resolve", {}, 1, 404, "belongs to app 'other-app'"),
    ("GET", "/restate/awakeables/awk_x/resolve", {}, None, 405, "allowed: POST"),
    ("GET", "/restate/state/greeter/bob", {}, None, 400, "is stateless"),
    ("GET", "/restate/state/nosuch/bob", {}, None, 404, "has no service"),
    ("POST", "/restate/state/counter/bob", {}, None, 405, "allowed: GET"),
]


@pytest.mark.parametrize("method,path,headers,body,status,message", BAD_INPUT,
                         ids=[f"{r[4]}-{r[0]} {r[1][:40]}" for r in BAD_INPUT])
def test_bad_input_gets_a_clear_4xx(served: tuple[str, Http], method: str, path: str, headers: dict[str, str],
                                    body: Any, status: int, message: str) -> None:
    _, client = served
    got, h, raw = client(method, path, body, headers, timeout=30)
    assert got == status, raw
    assert h["content-type"].startswith("application/json")
    assert message in json.loads(raw)["message"], raw
    if status == 405:
        assert h["allow"]


def test_binary_keys_state_after_write_send_delay_and_client_call(served: tuple[str, Http], kafka: str) -> None:
    app, client = served
    key = b"\x00\xff/ %k\n"
    path = quote_from_bytes(key, safe=b"")
    status, h, body = client("POST", f"/counter/{path}/echo", b"\x01\x02\xfe",
                             {"Content-Type": "application/octet-stream"})
    assert (status, body, h["content-type"]) == (200, b"\x01\x02\xfe", "application/octet-stream")
    inv = h["x-oncely-invocation-id"]
    assert inv.endswith(f"_{partition_for(key, PARTITIONS)}")
    status, _, body = client("GET", f"/restate/state/counter/{path}")
    assert (status, json.loads(body)) == (200, {"last": {"b64": "AQL+"}})
    assert client("GET", f"/restate/state/counter/{path}/last")[2] == b"\x01\x02\xfe"
    assert client("GET", f"/restate/state/counter/{path}/nothing")[0] == 404
    assert client("GET", f"/restate/output/{inv}")[2] == b"\x01\x02\xfe"  # the assigned key kept it
    plain = inv.rsplit("_", 1)[0]
    assert client("GET", f"/restate/attach/{plain}")[2] == b"\x01\x02\xfe"  # found by asking every partition
    assert client("GET", f"/restate/output/{format_id(random_id())}")[0] == 404

    # A read after a write sees it (the ReadState is behind the call on the log).
    for i in range(1, 11):
        status, _, body = client("POST", "/counter/rw/add", 1)
        assert (status, json.loads(body)) == (200, i)
        assert json.loads(client("GET", "/restate/state/counter/rw/n")[2]) == i

    # Stateless, and the /restate/call and /restate/send forms.
    assert json.loads(client("POST", "/restate/call/greeter/hello", "ann")[2]) == "hello ann"
    status, _, body = client("POST", "/restate/send/counter/later/add?delay=2s", 5)
    assert status == 202 and json.loads(body)["status"] == "accepted"
    sent = time.monotonic()
    assert client("GET", "/restate/state/counter/later/n")[0] == 404
    wait_until(lambda: client("GET", "/restate/state/counter/later/n")[2] == b"5", 30, 0.2, "the delayed send")
    assert time.monotonic() - sent >= 1.5
    status, _, body = client("POST", "/counter/later/add/send", 1, {"Idempotency-Key": "s1"})
    assert status == 202
    assert client("GET", "/restate/invocation/counter/later/add/s1/attach")[2] == b"6"

    # A terminal failure is a 500 with the handler's message; wait 0 is a 202 at once.
    status, _, body = client("POST", "/counter/x/fail")
    assert (status, json.loads(body)["message"]) == (500, "no way")
    status, h, body = client("POST", "/counter/w/add", 1, {"x-oncely-wait": "0", "Idempotency-Key": "w0"})
    if status == 202:
        assert h["location"] == f"/restate/attach/{json.loads(body)['invocation_id']}"
    assert client("GET", h.get("location", "/restate/invocation/counter/w/add/w0/attach"))[2] == b"1"

    # Client.call goes the same way, and shares idempotency keys with HTTP.
    with oncely.Client(kafka, app=app) as c:
        assert c.call("counter", key, "echo", b"raw") == b"raw"
        assert c.call("counter", "cc", "add", 3, idempotency_key="same") == 3
        assert json.loads(client("POST", "/counter/cc/add", 3, {"Idempotency-Key": "same"})[2]) == 3
        assert c.call("counter", "cc", "add", 3, idempotency_key="same") == 3
        with pytest.raises(oncely.TerminalError, match="no way"):
            c.call("counter", "x", "fail")


def test_openapi_document_describes_the_routes_and_the_apps_handlers(served: tuple[str, Http]) -> None:
    _, client = served
    status, _, body = client("GET", "/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.1")
    for p in ("/restate/call/{service}/{key}/{handler}", "/restate/awakeables/{awakeable_id}/resolve",
              "/restate/state/{service}/{key}/{name}", "/counter/{key}/add", "/greeter/hello"):
        assert p in doc["paths"], p
    assert "409" in doc["paths"]["/restate/awakeables/{awakeable_id}/resolve"]["post"]["responses"]
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)


def test_calls_sent_twice_across_two_kill9s_get_one_result_each_and_run_once(kafka: str, tmp_path: Path) -> None:
    """2,000 calls with idempotency keys, each sent twice (a third of them
    twice at once), the processor killed -9 twice meanwhile: both requests
    of a call get the same result, and each handler ran once (the committed
    per-key state counts the runs and sums the amounts)."""
    app, port = unique_name("gwx"), _port()
    env = _env(app, ONCELY_TEST_SLOW="0.05")
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    gw = GatewayProcess(kafka, env, port, tmp_path / "gw.log")
    client = Http(port)
    n_calls, keys = 2000, 100
    rng = random.Random(3)
    calls = [(f"k{rng.randrange(keys)}", rng.randint(1, 9)) for _ in range(n_calls)]
    answers: dict[int, list[int]] = {i: [] for i in range(n_calls)}
    lock = threading.Lock()

    def call(i: int) -> None:
        key, amount = calls[i]
        while True:  # a 202, a 503 or a broken connection: the same key again attaches
            try:
                status, _, body = client("POST", f"/counter/{key}/add", amount,
                                         {"Idempotency-Key": f"c{i}", "x-oncely-wait": "20"}, timeout=60)
            except OSError:
                time.sleep(0.5)
                continue
            if status == 200:
                with lock:
                    answers[i].append(json.loads(body))
                return
            assert status in (202, 503), body

    def answered() -> int:
        with lock:
            return sum(len(a) for a in answers.values())

    try:
        client.ready()
        with ThreadPoolExecutor(32) as pool:
            # Every call twice: a third at once (concurrently), the rest after both kills.
            futures = []
            for i in range(n_calls):
                futures.append(pool.submit(call, i))
                if i % 3 == 0:
                    futures.append(pool.submit(call, i))
            for share in (4, 2):  # kill when a quarter, then half of the first requests are answered
                wait_until(lambda: answered() > n_calls // share, 120, 0.05, f"1/{share} answered")
                proc.kill9()
                proc.start()
            futures += [pool.submit(call, i) for i in range(n_calls) if i % 3 != 0]
            for f in futures:
                f.result(timeout=300)
        by_key: dict[str, list[int]] = {}
        for i, got in answers.items():
            assert len(got) == 2 and got[0] == got[1], (i, got)
            by_key.setdefault(calls[i][0], []).append(got[0])
        for key, results in by_key.items():
            sums = sorted(results)
            total = sum(a for k, a in calls if k == key)
            assert len(set(sums)) == len(sums) and sums[-1] == total, (key, sums, total)
            state = json.loads(client("GET", f"/restate/state/counter/{key}")[2])
            assert state == {"n": total, "runs": len(results)}, key
    finally:
        gw.stop()
        assert proc.stop() == 0, proc.log_text()[-3000:]


def test_attach_after_a_restart_and_awakeables_over_http(kafka: str, tmp_path: Path) -> None:
    app, port = unique_name("gwa"), _port()
    env = _env(app, ONCELY_SUSPEND_AFTER="0.5")
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    gw = GatewayProcess(kafka, env, port, tmp_path / "gw.log")
    client = Http(port)
    try:
        client.ready()
        located = {}
        for w in ("w1", "w2", "w3", "w5"):
            status, h, body = client("POST", f"/waiter/{w}/wait", None,
                                     {"Idempotency-Key": f"a-{w}", "x-oncely-wait": "0.5"})
            assert status == 202 and h["location"].startswith("/restate/attach/inv_"), body
            located[w] = h["location"]
        awk = {w: wait_until(lambda w=w: (r := client("GET", f"/restate/state/ids/{w}/id"))[0] == 200 and
                             json.loads(r[2]), 30, 0.2, f"the awakeable of {w}") for w in located}
        status, _, body = client("GET", located["w1"], headers={"x-oncely-wait": "0.5"})
        assert status == 202 and json.loads(body)["status"] == "running"
        status, _, body = client("GET", located["w1"].replace("attach", "output"))
        assert status == 470, body

        proc.kill9()
        # Down: the resolution stays on the log, the gateway answers 202 within the wait.
        status, _, body = client("POST", f"/restate/awakeables/{awk['w3']}/resolve", {"late": True},
                                 {"x-oncely-wait": "1"})
        assert status == 202, body
        # Down, with a longer wait: answered once the processor is back.
        late: list[tuple[int, Any]] = []
        waiting = threading.Thread(target=lambda: late.append(client(
            "POST", f"/restate/awakeables/{awk['w5']}/resolve", {"v": 5}, {"x-oncely-wait": "120"}, timeout=150)))
        waiting.start()
        time.sleep(1)
        proc.start()
        waiting.join(150)
        assert late and (late[0][0], json.loads(late[0][2])) == (200, {"ok": True}), late
        assert json.loads(client("GET", located["w5"])[2]) == {"got": {"v": 5}}

        status, _, body = client("POST", f"/restate/awakeables/{awk['w1']}/resolve", {"v": 1})
        assert (status, json.loads(body)) == (200, {"ok": True})
        status, _, body = client("POST", f"/restate/awakeables/{awk['w1']}/resolve", {"v": 2})
        assert status == 404 and "not in flight" in json.loads(body)["message"]  # w1 finished at once
        status, _, _ = client("POST", f"/restate/awakeables/{awk['w2']}/reject", b"no stock",
                              {"Content-Type": "text/plain"})
        assert status == 200
        assert json.loads(client("GET", located["w1"])[2]) == {"got": {"v": 1}}
        assert json.loads(client("GET", located["w2"])[2]) == {"rejected": "no stock"}
        assert json.loads(client("GET", located["w3"])[2]) == {"got": {"late": True}}
        # The same call again attaches to the finished invocation.
        assert json.loads(client("POST", "/waiter/w1/wait", None, {"Idempotency-Key": "a-w1"})[2]) == \
            {"got": {"v": 1}}
        status, _, body = client("POST", f"/restate/awakeables/{awk['w3']}/resolve", 1)
        assert status == 404 and "not in flight" in json.loads(body)["message"]
        # 409: completed already while its invocation is still in flight (waiting on b).
        client("POST", "/waiter/w4/twice", None, {"x-oncely-wait": "0"})
        ab = wait_until(lambda: (r := client("GET", "/restate/state/ids/w4"))[0] == 200 and
                        len(d := json.loads(r[2])) == 2 and d, 30, 0.2, "both awakeables of w4")
        assert client("POST", f"/restate/awakeables/{ab['a']}/resolve", "A")[0] == 200
        status, _, body = client("POST", f"/restate/awakeables/{ab['a']}/resolve", "again")
        assert status == 409 and "already completed" in json.loads(body)["message"], body
        assert client("POST", f"/restate/awakeables/{ab['b']}/resolve", "B")[0] == 200
        status, h, _ = client("POST", "/restate/awakeables/" + ab["b"] + "/resolve", "B")
        assert status in (404, 409)  # finished, or about to: either way not completed twice
        nowhere = format_awakeable(app, 1, idempotent_id("waiter", "wait", b"zz", "none"), 1)
        assert client("POST", f"/restate/awakeables/{nowhere}/resolve", 1)[0] == 404
    finally:
        gw.stop()
        assert proc.stop() == 0, proc.log_text()[-3000:]


def test_a_caller_attached_while_it_runs_is_answered_when_it_ends_also_after_a_kill9(kafka: str,
                                                                                      tmp_path: Path) -> None:
    """An attach that waits is remembered with the invocation (requests.py):
    the transaction that finishes it answers, also when the processor was
    killed -9 between the attach and the end (the restart finds the waiter
    in the store; the standalone gateway keeps the request open). Not
    answered, the attach would wait out its 60 s."""
    app, port = unique_name("gwt"), _port()
    env = _env(app)
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    gw = GatewayProcess(kafka, env, port, tmp_path / "gw.log")
    client = Http(port)
    try:
        client.ready()
        status, h, body = client("POST", "/waiter/wt/wait", None, {"Idempotency-Key": "t-wt", "x-oncely-wait": "0.5"})
        assert status == 202, body
        awk = wait_until(lambda: (r := client("GET", "/restate/state/ids/wt/id"))[0] == 200 and json.loads(r[2]),
                         30, 0.2, "the awakeable")
        attached: list[tuple[float, Any]] = []
        waiting = threading.Thread(target=lambda: attached.append(
            (time.monotonic(), client("GET", h["location"], headers={"x-oncely-wait": "60"}, timeout=90))))
        waiting.start()
        time.sleep(1.5)  # the attach is applied and committed (commits every 50 ms)
        proc.kill9()
        proc.start()
        status, _, body = client("POST", f"/restate/awakeables/{awk}/resolve", {"v": 7}, {"x-oncely-wait": "60"},
                                 timeout=90)
        assert status == 200, body
        resolved = time.monotonic()
        waiting.join(90)
        assert attached, "the attached caller got no answer"
        at, (status, _, body) = attached[0]
        assert (status, json.loads(body)) == (200, {"got": {"v": 7}}), body
        assert at - resolved < 20, f"answered {at - resolved:.1f} s after the end, not by its transaction"
    finally:
        gw.stop()
        assert proc.stop() == 0, proc.log_text()[-3000:]
