"""Deployments of remote handlers on a real broker, with endpoint processes
(`tests.apps.remote_deploy VERSION`) and the `oncely deployments` CLI:
register / list / describe / remove; breaking changes refused unless
forced; a running processor takes a registration without a restart; an
upgrade while invocations wait: they finish on the deployment that first ran
them (their pin), new ones run on the newest; removing a deployment is
refused while invocations are pinned to it."""

from __future__ import annotations

import http.server
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest
from apps.remote_deploy import processor_app

import oncely
from oncely.processor.invocation import PAUSED
from oncely.remote.registry import deployment_id
from oncely.testing import read_to_end, unique_name
from support import REPO, InProcessProcessor, changelog_state, oncely_cli, wait_until

SPEC = "tests.apps.remote_deploy:app"


class EndpointProcess:
    """`python -m tests.apps.remote_deploy VERSION`, on a port of its own."""

    def __init__(self, version: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("ONCELY_VERIFY_KEYS", "ONCELY_SIGNING_SECRET")}
        with open(log, "a") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.apps.remote_deploy", version], cwd=REPO,
                                         env=env, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline().decode()
                if line.startswith("PORT "):
                    self.url = f"http://127.0.0.1:{int(line.split()[1])}"
                    self.id = deployment_id(self.url)
                    return
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"endpoint {version} did not start: {log}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.delenv("ONCELY_SIGNING_SECRET", raising=False)
    monkeypatch.delenv("ONCELY_SIGNING_KEY_FILE", raising=False)
    started: list[EndpointProcess] = []

    def start(version: str) -> EndpointProcess:
        ep = EndpointProcess(version, tmp_path / f"endpoint-{version}.log")
        started.append(ep)
        return ep

    yield start
    for ep in started:
        ep.kill()


class Deployments:
    """`oncely deployments …` of one app, as a user runs it."""

    def __init__(self, kafka: str, app: str) -> None:
        self.kafka = kafka
        self.app = app

    def __call__(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        r = oncely_cli("deployments", *args, "--app", SPEC, "--bootstrap", self.kafka,
                       env={"DEPLOY_TEST_APP": self.app})
        assert (r.returncode == 0) == ok, f"{args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        if not ok:  # one line, no traceback
            assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r

    def describe(self, dep_id: str) -> dict[str, Any]:
        return orjson.loads(self("describe", dep_id).stdout)


def _serving(runner: InProcessProcessor, dep_id: str) -> None:
    """Until the running processor applied a registration (it follows the
    topic: a registration reaches it shortly after the CLI returns)."""
    wait_until(lambda: runner.on_loop(lambda: runner.app.services["acct"].deployment) == dep_id, 30, 0.1,
               f"the processor serving acct from {dep_id}")


def _outputs(kafka: str, topic: str) -> dict[str, dict[str, Any]]:
    return {orjson.loads(r.value or b"")["id"]: orjson.loads(r.value or b"") for r in read_to_end(kafka, topic)}


def _send(kafka: str, app: str, handler: str, key: str, msg: dict[str, Any]) -> None:
    client = oncely.Client(kafka, app=app)
    client.send("acct", key, handler, msg)
    client.flush()
    client.close()


@pytest.fixture
def garbage_server(tmp_path: Path) -> Iterator[str]:
    """A plain HTTP server whose `/discover` answers 200 with no manifest."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "discover").write_text("this is not a manifest")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(tmp_path / "www"), **kw)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_register_list_describe_remove_and_breaking_changes(kafka: str, kafka_topic: Any, tmp_path: Path,
                                                            endpoints: Any, garbage_server: str) -> None:
    name = unique_name("deploy-cli")
    out = kafka_topic(1, prefix="deploy-cli-out")
    cli = Deployments(kafka, name)
    runner = InProcessProcessor(processor_app(name, bootstrap=kafka, state_dir=str(tmp_path / "s"))).start()
    try:
        v1, v3, flip, local = endpoints("v1"), endpoints("v3"), endpoints("flip"), endpoints("local")
        assert "no deployments registered" in cli("list").stdout
        assert f"registered {v1.id} ({v1.url}): services acct" in cli("register", v1.url).stdout
        _serving(runner, v1.id)
        assert "registered already" in cli("register", v1.url).stdout
        [row] = orjson.loads(cli("list", "--json").stdout)
        assert (row["id"], row["uri"], row["newest_for"]) == (v1.id, v1.url, ["acct"])
        d = cli.describe(v1.id)
        assert d["services"] == [{"name": "acct", "keyed": True, "handlers": ["wait", "quick", "legacy"]}]
        assert (d["pinned"], d["pending"]) == (0, 0)
        by_name = oncely_cli("deployments", "list", "--app", name, "--bootstrap", kafka)  # the app by name only
        assert by_name.returncode == 0 and f"{v1.id}  {v1.url}" in by_name.stdout and "acct*" in by_name.stdout
        # the running processor took it without a restart
        _send(kafka, name, "quick", "k", {"id": "q1", "topic": out})
        wait_until(lambda: "q1" in _outputs(kafka, out), 60, 0.3, "q1's output")
        assert _outputs(kafka, out)["q1"]["ran"] == "v1"

        # refused: one line each, nothing registered
        r = cli("register", v3.url, ok=False)
        assert "refused without --force" in r.stderr and "drops handler(s) legacy" in r.stderr
        r = cli("register", flip.url, ok=False)
        assert "changes from keyed to stateless" in r.stderr
        r = cli("register", local.url, ok=False)
        assert "notes" in r.stderr and "defined in-process" in r.stderr
        assert "unreachable" in cli("register", "http://127.0.0.1:9", ok=False).stderr
        assert "bad manifest" in cli("register", garbage_server, ok=False).stderr
        assert "dry run" in cli("register", v3.url, "--force", "--dry-run").stdout
        assert [d["id"] for d in orjson.loads(cli("list", "--json").stdout)] == [v1.id]

        # forced: the breaking deployment takes new invocations, at once
        r = cli("register", v3.url, "--force")
        assert f"registered {v3.id}" in r.stdout and "drops handler(s) legacy" in r.stderr
        _serving(runner, v3.id)
        _send(kafka, name, "quick", "k", {"id": "q2", "topic": out})
        wait_until(lambda: "q2" in _outputs(kafka, out), 60, 0.3, "q2's output")
        assert _outputs(kafka, out)["q2"]["ran"] == "v3"
        rows = orjson.loads(cli("list", "--json").stdout)
        assert [(d["id"], d["newest_for"]) for d in rows] == [(v1.id, []), (v3.id, ["acct"])]

        assert f"removed {v3.id}" in cli("remove", v3.id).stdout
        assert "no deployment" in cli("remove", v3.id, ok=False).stderr
        assert "no deployment" in cli("describe", v3.id, ok=False).stderr
        assert [d["id"] for d in orjson.loads(cli("list", "--json").stdout)] == [v1.id]
        # the processor followed the removal: acct is v1's again
        _serving(runner, v1.id)
        _send(kafka, name, "quick", "k", {"id": "q3", "topic": out})
        wait_until(lambda: "q3" in _outputs(kafka, out), 60, 0.3, "q3's output")
        assert _outputs(kafka, out)["q3"]["ran"] == "v1"
    finally:
        runner.stop()
    assert read_to_end(kafka, f"{name}.dlq") == []


def test_upgrade_while_suspended_finishes_on_the_pinned_deployment(kafka: str, kafka_topic: Any, tmp_path: Path,
                                                                   endpoints: Any) -> None:
    name = unique_name("deploy-pin")
    out = kafka_topic(1, prefix="deploy-pin-out")
    cli = Deployments(kafka, name)

    def processor() -> InProcessProcessor:
        # suspend_after: the waiting invocations leave memory, so their pin
        # must come back from the store when they resume
        return InProcessProcessor(processor_app(name, bootstrap=kafka, state_dir=str(tmp_path / "s"),
                                                suspend_after=0.5)).start()

    def awakeable(key: str) -> str | None:
        return changelog_state(kafka, name).get(("notes", key.encode(), "awakeable"))

    runner = processor()
    try:
        v1, v2 = endpoints("v1"), endpoints("v2")
        cli("register", v1.url)
        _serving(runner, v1.id)
        for key in ("a", "b"):
            _send(kafka, name, "wait", key, {"id": key, "topic": out})
        ids = {k: wait_until(lambda k=k: awakeable(k), 60, 0.3, f"{k}'s awakeable") for k in ("a", "b")}
        wait_until(lambda: cli.describe(v1.id)["pinned"] == 2, 60, 0.5, "two invocations pinned to v1")

        assert f"registered {v2.id}" in cli("register", v2.url).stdout  # same handlers: not breaking
        _serving(runner, v2.id)
        r = cli("remove", v1.id, ok=False)
        assert "2 in-flight invocation(s) pinned to it" in r.stderr
        _send(kafka, name, "quick", "c", {"id": "c", "topic": out})  # new: the newest deployment
        wait_until(lambda: "c" in _outputs(kafka, out), 60, 0.3, "c's output")
        assert _outputs(kafka, out)["c"]["ran"] == "v2"
    finally:
        runner.stop()

    runner = processor()  # a restart: registrations and pins come back from Kafka
    try:
        client = oncely.Client(kafka, app=name)
        for key, awk in ids.items():
            client.resolve_awakeable(awk, {"ok": key})
        client.close()
        wait_until(lambda: {"a", "b"} <= set(_outputs(kafka, out)), 60, 0.3, "a's and b's outputs")
        outputs = _outputs(kafka, out)
        assert [outputs[k]["after_wait"] for k in ("a", "b")] == ["v1", "v1"], "an upgrade changed running code"
        assert outputs["a"]["got"] == {"ok": "a"}
        wait_until(lambda: cli.describe(v1.id)["pinned"] == 0, 60, 0.5, "no invocation pinned to v1")
        assert f"removed {v1.id}" in cli("remove", v1.id).stdout
    finally:
        runner.stop()
    assert read_to_end(kafka, f"{name}.dlq") == []


def test_forced_removal_pauses_pinned_invocations_until_registered_again(kafka: str, kafka_topic: Any,
                                                                         tmp_path: Path, endpoints: Any) -> None:
    name = unique_name("deploy-gone")
    out = kafka_topic(1, prefix="deploy-gone-out")
    cli = Deployments(kafka, name)
    v1 = endpoints("v1")

    def processor() -> InProcessProcessor:  # the app names v1 itself: registered at start
        return InProcessProcessor(processor_app(name, bootstrap=kafka, state_dir=str(tmp_path / "s"),
                                                deployments=[v1.url])).start()

    def paused(runner: InProcessProcessor) -> list[str | None]:
        return runner.on_loop(lambda: [inv.error for p in runner.processor.partitions.values()  # type: ignore
                                       for inv in p.invocations.values() if inv.phase == PAUSED])

    runner = processor()
    try:
        assert [d["id"] for d in orjson.loads(cli("list", "--json").stdout)] == [v1.id]
        _send(kafka, name, "wait", "p", {"id": "p", "topic": out})
        awk = wait_until(lambda: changelog_state(kafka, name).get(("notes", b"p", "awakeable")), 60, 0.3,
                         "p's awakeable")
        wait_until(lambda: cli.describe(v1.id)["pinned"] == 1, 60, 0.5, "p pinned to v1")
        assert "1 pinned invocation(s) will pause" in cli("remove", v1.id, "--force").stdout
        wait_until(lambda: runner.on_loop(lambda: v1.id not in runner.app.remote_deployments), 30, 0.1,
                   "the processor following the removal")
        client = oncely.Client(kafka, app=name)
        client.resolve_awakeable(awk, {"ok": "p"})
        client.close()
        [error] = wait_until(lambda: paused(runner), 60, 0.3, "p paused")
        assert error is not None and f"{v1.id}, which this invocation is pinned to, is not registered" in error
        assert "p" not in _outputs(kafka, out)
    finally:
        runner.stop()
    runner = processor()  # registers v1 again; paused invocations are retried once per start
    try:
        wait_until(lambda: "p" in _outputs(kafka, out), 60, 0.3, "p's output")
        assert _outputs(kafka, out)["p"] == {"id": "p", "after_wait": "v1", "got": {"ok": "p"}}
    finally:
        runner.stop()
    assert read_to_end(kafka, f"{name}.dlq") == []


def _dep(uri: str, at: int, services: list[dict[str, Any]]) -> Any:
    from oncely.remote.registry import parse_manifest

    dep = parse_manifest(uri, orjson.dumps({"protocol": {"min": 1, "max": 1}, "services": services}))
    dep.registered_at_ms = at
    return dep


def test_newest_registration_wins_and_what_breaks() -> None:
    from oncely.remote.deployments import Registrations, breaking_changes, decode_record, encode_record

    keyed = {"name": "acct", "keyed": True, "handlers": [{"name": "a"}, {"name": "b"}]}
    old = _dep("http://h:1", 5, [keyed])
    new = _dep("http://h:2", 9, [{**keyed, "handlers": [{"name": "a"}, {"name": "c"}]}])
    regs = Registrations()
    for d in (new, old):  # read order does not matter, registration time does
        regs.apply(d.id.encode(), encode_record(d))
    assert regs.latest()["acct"].id == new.id
    assert breaking_changes(old, new) == ["service 'acct' drops handler(s) b"]
    assert breaking_changes(old, _dep("http://h:3", 1, [{**keyed, "keyed": False}])) == [
        "service 'acct' changes from keyed to stateless"]
    assert breaking_changes(new, old) == ["service 'acct' drops handler(s) c"]
    assert breaking_changes(old, _dep("http://h:4", 1, [{"name": "other", "keyed": True, "handlers": []}])) == []
    back = decode_record(old.id.encode(), encode_record(old))
    assert (back.id, back.uri, back.manifest, back.registered_at_ms) == (old.id, old.uri, old.manifest, 5)
    with pytest.raises(ValueError):  # a record filed under another id
        decode_record(new.id.encode(), encode_record(old))
    regs.apply(new.id.encode(), None)  # a tombstone
    assert regs.latest()["acct"].id == old.id and list(regs.by_id) == [old.id]
