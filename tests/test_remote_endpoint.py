"""The remote endpoint over real HTTP: `tests.apps.remote_app` served by
aiohttp in its own process, driven by aiohttp's client as a processor would
(wire protocol v1). No broker: the endpoint never touches Kafka."""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from apps.remote_client import REPO, EndpointProcess, entries_of, http, invoke, item, unb64, value_of

from oncely.remote.answers import BadAnswer, parse_answers
from oncely.remote.wire import INVOKE_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, invoke_request
from oncely.sdk.protocol import Entry, encode_value
from oncely.shuffle.ids import child_id, format_awakeable, format_id, random_id


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProcess]:
    server = EndpointProcess(tmp_path_factory.mktemp("remote") / "endpoint.log")
    yield server
    server.stop()


def one(base: str, it: dict[str, Any], **kw: Any) -> dict[str, Any]:
    status, doc = invoke(base, [it], **kw)
    assert status == 200, doc
    [answer] = doc["items"]
    assert answer["id"] == it["id"]
    return answer


def test_discover_and_health(endpoint: EndpointProcess) -> None:
    for path in ("/discover", "/some/gateway/prefix/discover/"):
        status, headers, body = http("GET", endpoint.base + path, headers={"accept": MANIFEST_MEDIA_TYPE})
        assert status == 200 and headers["content-type"].startswith(MANIFEST_MEDIA_TYPE)
        assert headers["x-oncely-sdk"].startswith("oncely/")
        m = orjson.loads(body)
        assert m["protocol"] == {"min": 1, "max": 1} and m["encodings"] == ["json"] and m["compression"] == ["gzip"]
        assert m["platform"] == "aiohttp" and m["max_batch"] == 8 and m["app"] == "remote-test"
        assert m["max_request_bytes"] == 8 * 1024 * 1024 and m["sinks"] == {"order-events": "bytes"}
        services = {s["name"]: s for s in m["services"]}
        assert services["orders"]["keyed"] and not services["audit"]["keyed"]
        assert services["orders"]["retry"]["max_attempts"] == 10
        assert [h["name"] for h in services["orders"]["handlers"]] == ["place"]
        assert {"name": "record", "takes_input": True, "state_hints": None, "timeout_s": None} in \
            services["audit"]["handlers"]
    assert http("GET", endpoint.base + "/health")[0] == 200


def place_first_run(base: str, inv: bytes) -> dict[str, Any]:
    return one(base, item(inv, "orders", "place", b"alice", {"sku": "s1", "qty": 2}, state={"count": 4}))


def test_invoke_runs_every_step_and_suspends_on_the_waits(endpoint: EndpointProcess) -> None:
    inv = random_id()
    answer = place_first_run(endpoint.base, inv)
    assert answer["known"] == 0 and answer["status"] == "suspended" and answer["awaiting"] == [6, 7, 8]
    kinds = [(e["kind"], e["name"], e["completed"]) for e in answer["entries"]]
    assert kinds == [("get", "count", True), ("set", "count", True), ("run", "stock", True),
                     ("emit", "order-events", True), ("emit", "order-log", True), ("send", "audit/record", True),
                     ("call", "pricing/quote", False), ("sleep", "", False), ("awakeable", "", False)]
    e = answer["entries"]
    assert value_of(e[2]["value"]) == {"sku": "s1", "stock": 7}
    send, call, sleep = e[5]["op"], e[6]["op"], e[7]["op"]
    # The callee ids are the processor's: child_id(caller, journal index).
    assert send == {"op": "send", "service": "audit", "handler": "record", "key": None, "delay_ms": 2500,
                    "input": {"format": "JSON", "data": send["input"]["data"]}, "callee": format_id(child_id(inv, 5))}
    assert entries_of(answer)[5].value == child_id(inv, 5)  # the send entry holds the callee id
    assert call["callee"] == format_id(child_id(inv, 6)) and unb64(call["key"]) == b"s1"
    assert orjson.loads(unb64(call["input"]["data"]) or b"") == 2
    assert sleep["op"] == "sleep" and 1490 <= sleep["duration_ms"] <= 1500
    assert "op" not in e[8] and "op" not in e[0]


def completed(entries: list[Entry], values: dict[int, Any]) -> list[Entry]:
    """The journal as the processor sends it after completions arrived."""
    out = []
    for i, e in enumerate(entries):
        if i in values:
            v = values[i]
            e = Entry(e.kind, e.name, e.value if v is ... else encode_value(v), None, True)
        out.append(e)
    return out


def test_a_replay_with_completions_continues_and_completes(endpoint: EndpointProcess) -> None:
    inv = random_id()
    first = place_first_run(endpoint.base, inv)
    journal = entries_of(first)
    # Only the call completed: still suspended, on the other two, with nothing new.
    part = one(endpoint.base, item(inv, "orders", "place", b"alice", {"sku": "s1", "qty": 2},
                                   journal=completed(journal, {6: 6}), state={"count": 4}))
    assert part["status"] == "suspended" and part["awaiting"] == [7, 8] and part["known"] == 9
    assert part["entries"] == []
    done = one(endpoint.base, item(inv, "orders", "place", b"alice", {"sku": "s1", "qty": 2},
                                   journal=completed(journal, {6: 6, 7: ..., 8: "approved"}), state={"count": 4},
                                   attempt=1))
    assert done["status"] == "completed" and done["known"] == 9
    assert [(e["kind"], e["name"]) for e in done["entries"]] == [("set", "last")]
    assert value_of(done["output"]) == {"count": 5, "stock": 7, "quote": 6, "approved": "approved"}
    state = done["state"]
    assert state["clear"] == [] and state["clear_all"] is False
    assert value_of(state["set"]["count"]) == 5
    assert value_of(state["set"]["last"]) == {"quote": 6, "approved": "approved",
                                              "awakeable": format_awakeable("remote-test", 3, inv, 8)}
    ev, lg = done["emits"]
    assert ev["topic"] == "order-events" and ev["value"]["format"] == "bytes"
    assert unb64(ev["value"]["data"]) == b"placed s1"
    assert ev["key"] == "YWxpY2U=" and ev["headers"] == [{"name": "n", "value": "NQ=="}]
    assert lg["topic"] == "order-log" and lg["value"]["format"] == "json" and lg["headers"] is None
    assert orjson.loads(unb64(lg["value"]["data"]) or b"") == {"order": {"sku": "s1", "qty": 2}, "n": 5}


def test_a_different_step_on_replay_pauses(endpoint: EndpointProcess) -> None:
    journal = [Entry("get", "count"), Entry("set", "count"), Entry("run", "price-lookup", encode_value(1))]
    answer = one(endpoint.base, item(random_id(), "orders", "place", b"bob", {"sku": "s", "qty": 1},
                                     journal=journal, state={}))
    assert answer["status"] == "paused" and "non-determinism at journal index 2" in answer["error"]
    assert answer["entries"] == []


def test_terminal_retry_self_call_and_unknown_handler(endpoint: EndpointProcess) -> None:
    items = [item(random_id(), "pricing", "fail_terminal", b"p", None, state={}),
             item(random_id(), "pricing", "fail_retry", b"p", None, state={}),
             item(random_id(), "pricing", "self_call", b"p", None, state={}),
             item(random_id(), "pricing", "nope", b"p", None, state={}),
             item(random_id(), "pricing", "quote", None, 1),
             item(random_id(), "audit", "record", None, {"x": 1})]
    status, doc = invoke(endpoint.base, items)
    assert status == 200
    terminal, retry, self_call, unknown, keyless, stateless = doc["items"]
    assert [a["id"] for a in doc["items"]] == [it["id"] for it in items]
    assert terminal["status"] == "terminal" and terminal["error"] == "no such product"
    assert [e["kind"] for e in terminal["entries"]] == ["set"]  # applied as journal, its state discarded
    assert retry["status"] == "retry" and retry["error"].startswith("RuntimeError: flaky backend")
    assert self_call["status"] == "terminal" and "calls its own key" in self_call["error"]
    assert unknown["status"] == "unknown_handler"
    assert keyless["status"] == "terminal" and "keyed" in keyless["error"]
    assert stateless["status"] == "completed" and value_of(stateless["output"]) == items[5]["id"]


def test_need_state_round_trips_with_partial_state(endpoint: EndpointProcess) -> None:
    inv = random_id()
    first = one(endpoint.base, item(inv, "pricing", "read_two", b"k", None, state={"a": 1}, complete=False))
    assert first["status"] == "need_state" and first["names"] == ["b"] and first["keys"] is False
    assert [(e["kind"], e["name"]) for e in first["entries"]] == [("get", "a"), ("get", "b")]
    journal = entries_of(first)
    second = one(endpoint.base, item(inv, "pricing", "read_two", b"k", None, journal=journal,
                                     state={"a": 1, "b": 2}, complete=False))
    assert second["status"] == "need_state" and second["names"] == [] and second["keys"] is True
    assert [e["kind"] for e in second["entries"]] == ["state_keys"]
    journal += entries_of(second)
    third = one(endpoint.base, item(inv, "pricing", "read_two", b"k", None, journal=journal,
                                    state={"a": 1, "b": 2}, complete=False, names=["a", "b", "c"]))
    assert third["status"] == "completed" and third["entries"] == []
    assert value_of(third["output"]) == {"a": 1, "b": 2, "names": ["a", "b", "c"]}
    # A name the processor listed as absent needs no round trip.
    absent = one(endpoint.base, item(random_id(), "pricing", "read_two", b"k", None, state={"a": 1},
                                     complete=False, names=["a"]))
    assert absent["status"] == "completed" and value_of(absent["output"])["b"] is None


def test_the_deadline_answers_yield(endpoint: EndpointProcess) -> None:
    start = time.monotonic()
    answer = one(endpoint.base, item(random_id(), "pricing", "dawdle", b"k", None, state={}),
                 headers={"x-oncely-deadline-ms": "300"})
    assert time.monotonic() - start < 5
    assert answer["status"] == "yield" and [(e["kind"], e["name"]) for e in answer["entries"]] == [("set", "started")]


def test_a_parked_wait_is_not_suspended_while_a_step_runs(endpoint: EndpointProcess) -> None:
    answer = one(endpoint.base, item(random_id(), "pricing", "wait_during_run", b"k", None, state={}))
    assert answer["status"] == "suspended" and answer["awaiting"] == [0]
    assert [(e["kind"], e["name"], e["completed"]) for e in answer["entries"]] == [
        ("call", "pricing/quote", False), ("run", "slow", True)]


def _bad(base: str, path: str, method: str = "POST", body: bytes = b"{}", **headers: str) -> tuple[int, Any]:
    status, _, out = http(method, base + path, body, {"content-type": INVOKE_MEDIA_TYPE, **headers})
    return status, orjson.loads(out)


def test_whole_request_errors(endpoint: EndpointProcess) -> None:
    base = endpoint.base
    good = invoke_request("remote-test", 0, [item(random_id(), "audit", "record", None, 1)])
    ok_item = item(random_id(), "audit", "record", None, 1)
    cases: list[tuple[str, tuple[int, Any], int, str]] = [
        ("other media type", _bad(base, "/invoke", body=good, **{"content-type": "application/json"}), 415,
         "media type"),
        ("other version", _bad(base, "/invoke", body=good,
                               **{"content-type": "application/vnd.oncely.invoke.v2+json"}), 415, "version"),
        ("other encoding", _bad(base, "/invoke", body=good, **{"content-encoding": "br"}), 415, "content-encoding"),
        ("not JSON", _bad(base, "/invoke", body=b"{nope"), 400, "not JSON"),
        ("no items", _bad(base, "/invoke", body=b'{"app": "a", "partition": 0}'), 400, "items"),
        ("bad base64", _bad(base, "/invoke", body=invoke_request(
            "a", 0, [{**ok_item, "input": {"format": "JSON", "data": "!!"}}])), 400, "base64"),
        ("bad id", _bad(base, "/invoke", body=invoke_request("a", 0, [{**ok_item, "id": "x"}])), 400, "id"),
        ("bad format", _bad(base, "/invoke", body=invoke_request(
            "a", 0, [{**ok_item, "input": {"format": "XML", "data": ""}}])), 400, "format"),
        ("twice", _bad(base, "/invoke", body=invoke_request("a", 0, [ok_item, ok_item])), 400, "twice"),
        ("bad gzip", _bad(base, "/invoke", body=b"not gzip", **{"content-encoding": "gzip"}), 400, "gzip"),
        ("bad deadline", _bad(base, "/invoke", body=good, **{"x-oncely-deadline-ms": "soon"}), 400, "deadline"),
        ("too many", _bad(base, "/invoke", body=invoke_request(
            "a", 0, [item(random_id(), "audit", "record", None, i) for i in range(9)])), 413, "at most 8"),
        ("unknown path", _bad(base, "/elsewhere"), 404, "no route"),
        ("GET invoke", _bad(base, "/invoke", method="GET", body=b""), 405, "POST"),
        ("POST discover", _bad(base, "/discover"), 405, "GET"),
    ]
    for name, (status, doc), want, text in cases:
        assert status == want, (name, status, doc)
        assert text in doc["message"], (name, doc)
    status, doc = _bad(base, "/invoke", body=good, **{"content-type": "application/vnd.oncely.invoke.v2+json"})
    assert doc["protocol"] == {"min": 1, "max": 1} and doc["media_types"] == [INVOKE_MEDIA_TYPE]
    status, doc = _bad(base, "/invoke", body=gzip.compress(good), **{"content-encoding": "gzip"})
    assert status == 200 and doc["items"][0]["status"] == "completed"
    big = b'{"app": "a", "partition": 0, "items": []}' + b" " * (9 * 1024 * 1024)
    assert _bad(base, "/invoke", body=big)[0] == 413
    bomb = gzip.compress(b" " * (9 * 1024 * 1024))
    status, doc = _bad(base, "/invoke", body=bomb, **{"content-encoding": "gzip"})
    assert status == 413 and "inflates" in doc["message"]


def test_the_example_serves_the_demo_enrichment(tmp_path: Path) -> None:
    """examples/remote_enrichment.py: the demo's handler, unchanged, behind
    an aiohttp endpoint; an order comes back as state and an emit."""
    log = open(tmp_path / "example.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "oncely.examples.remote_enrichment", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving app 'enrichment'" in line, (tmp_path / "example.log").read_text()
        base = line.split(" on ")[1].split()[0]
        order = {"id": "o-1", "customer": "c-1", "amount": 1200}
        answer = one(base, item(random_id(), "customers", "add_order", b"c-1", order, state={"total": 3900}))
        assert answer["status"] == "completed" and value_of(answer["output"]) == 5100
        assert value_of(answer["state"]["set"]["total"]) == 5100 and value_of(answer["state"]["set"]["orders"]) == 1
        [emit] = answer["emits"]
        assert emit["topic"] == "enriched-orders" and emit["value"]["format"] == "json"
        assert orjson.loads(unb64(emit["value"]["data"]) or b"") == {**order, "running_total": 5100, "tier": "gold"}
        assert unb64(emit["key"]) == b"c-1" and emit["headers"] == [{"name": "source", "value": "b25jZWx5"}]
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_the_processor_side_checks_answers(endpoint: EndpointProcess) -> None:
    """`remote.answers.parse_answers` (the processor's side) reads a real
    answer into entries and ops, and refuses answers that break the protocol."""
    inv = random_id()
    it = item(inv, "orders", "place", b"alice", {"sku": "s1", "qty": 2}, state={"count": 4})
    status, _, raw = http("POST", endpoint.base + "/invoke", invoke_request("remote-test", 3, [it]),
                          {"content-type": INVOKE_MEDIA_TYPE})
    assert status == 200
    [a] = parse_answers(raw, [(inv, 0)])
    assert a.status == "suspended" and a.awaiting == [6, 7, 8] and len(a.entries) == 9
    assert a.ops[5].op == "send" and a.ops[5].delay_ms == 2500 and a.ops[5].service == "audit"
    assert a.ops[6].key == b"s1" and orjson.loads(a.ops[6].payload) == 2 and a.ops[7].duration_ms > 1000
    doc = orjson.loads(raw)

    def broken(change: Any) -> bytes:
        d = orjson.loads(raw)
        change(d["items"][0])
        return orjson.dumps(d)

    def set_(k: str, v: Any) -> Any:
        return lambda x: x.__setitem__(k, v)

    bad = {
        "known": broken(set_("known", 1)),
        "id": broken(set_("id", format_id(random_id()))),
        "kind": broken(lambda x: x["entries"][0].__setitem__("kind", "exec")),
        "callee": broken(lambda x: x["entries"][6]["op"].__setitem__("callee", format_id(random_id()))),
        "status": broken(set_("status", "done")),
        "awaiting": broken(set_("awaiting", [42])),
        "base64": broken(lambda x: x["entries"][2].__setitem__("value", "%%")),
        "count": orjson.dumps({"items": doc["items"] * 2}),
        "json": b"<html>",
    }
    for name, body in bad.items():
        with pytest.raises(BadAnswer):
            parse_answers(body, [(inv, 0)])
            pytest.fail(name)
    inv2 = random_id()
    body = invoke_request("remote-test", 3, [item(inv2, "audit", "record", None, {"x": 1})])
    [done] = parse_answers(http("POST", endpoint.base + "/invoke", body, {"content-type": INVOKE_MEDIA_TYPE})[2],
                           [(inv2, 0)])
    assert done.status == "completed" and done.output == encode_value(format_id(inv2)) and done.emits == []
