"""Invocation controls against a real broker: `oncely run --http --admin`
in a subprocess (tests/apps/controls_app.py); the tests use the admin API
and the ingress over HTTP, and the `oncely invocations` CLI over Kafka."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from oncely.testing import unique_name
from support import JsonHttp as Http, ProcessorProcess, free_port, oncely_cli, wait_until

SPEC = "tests.apps.controls_app:app"
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Served:
    """One processor with the ingress (`http`) and the admin API (`admin`)."""

    def __init__(self, kafka: str, tmp: Path) -> None:
        self.app = unique_name("ctl")
        self.kafka = kafka
        http_port, admin_port = free_port(), free_port()
        self.proc = ProcessorProcess(SPEC, kafka, tmp / "state", {
            "ONCELY_TEST_APP": self.app, "ONCELY_COMMIT_INTERVAL": "0.05", "ONCELY_SUSPEND_AFTER": "0.3",
            "ONCELY_HTTP": f"127.0.0.1:{http_port}", "ONCELY_ADMIN": f"127.0.0.1:{admin_port}",
            "ONCELY_ADMIN_TOKEN": TOKEN}, tmp / "p.log")
        self.http, self.admin = Http(http_port), Http(admin_port)

    def start(self) -> "Served":
        self.proc.start()
        wait_until(self._up, 90, 0.2, "the ingress and the admin API")
        return self

    def _up(self) -> bool:
        try:
            return self.http("GET", "/restate/health", timeout=5)[0] == 200 and \
                self.admin("GET", "/health", timeout=5)[0] == 200
        except OSError:
            return False

    def describe(self, inv: str) -> dict[str, Any]:
        status, _, body = self.admin("GET", f"/invocations/{inv}", headers=AUTH)
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def phase_is(self, inv: str, phase: str, timeout: float = 60) -> None:
        wait_until(lambda: self.describe(inv)["phase"] == phase, timeout, 0.2, f"{inv} {phase}")

    def charges(self, key: str) -> list[str]:
        """The suspended payments/charge invocations of `key`, as the admin API lists them."""
        status, _, listed = self.admin("GET", "/invocations?phase=SUSPENDED&limit=50", headers=AUTH)
        assert status == 200 and not listed["missing_partitions"], listed
        return [d["invocation_id"] for d in listed["invocations"]
                if d["target"] == "payments/charge" and d["key"] == key]

    def control(self, inv: str, action: str) -> tuple[int, Any]:
        status, _, body = self.admin("PATCH", f"/invocations/{inv}/{action}", headers=AUTH)
        return status, body

    def send(self, path: str, body: Any = None, key: str | None = None) -> str:
        headers = {"Idempotency-Key": key} if key else {}
        status, _, answer = self.http("POST", path + "/send", body, headers)
        assert status == 202, answer
        return answer["invocation_id"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def served(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(kafka, tmp_path_factory.mktemp("ctl")).start()
    try:
        yield s
    finally:
        assert s.proc.stop() == 0, s.proc.log_text()[-3000:]


def test_cancel_of_a_suspended_callee_gives_its_caller_a_terminal_error_and_the_caller_compensates(
        served: Served) -> None:
    trip = served.send("/trips/alice/book")
    served.phase_is(trip, "SUSPENDED")

    (charge,) = wait_until(lambda: served.charges("alice"), 60, 0.2, "the callee, listed")
    served.phase_is(charge, "SUSPENDED")
    assert served.control(charge, "cancel") == (200, {"invocation_id": charge, "action": "cancel",
                                                      "status": "applied"})
    status, _, body = served.http("GET", f"/restate/attach/{trip}")
    assert status == 409 and body["message"] == "cancelled", body  # the caller saw a TerminalError
    wait_until(lambda: served.http("GET", "/restate/state/audit/alice/log")[2] == "compensated: cancelled", 60, 0.2,
               "the compensation")
    assert served.describe(charge)["phase"] == "FAILED"
    status, body = served.control(charge, "cancel")
    assert status == 409 and "it has finished" in body["message"]


def test_kill_of_a_suspended_invocation_fails_it_at_once(served: Served) -> None:
    nap = served.send("/trips/bob/nap")
    served.phase_is(nap, "SUSPENDED")
    r = oncely_cli("invocations", "kill", served.app, nap, "--bootstrap", served.kafka)  # the CLI, over Kafka
    assert r.returncode == 0 and r.stdout.strip() == f"{nap}: kill applied", r.stderr
    status, _, body = served.http("GET", f"/restate/attach/{nap}")
    assert status == 409 and body["message"].endswith("killed by an operator"), body
    d = served.describe(nap)
    assert d["phase"] == "FAILED" and d["error"].startswith("killed"), d
    # The key is free again: the next invocation of bob runs.
    again = served.send("/trips/bob/hold")
    assert served.http("GET", f"/restate/attach/{again}")[2] == 1


def test_purge_is_refused_in_flight_then_frees_the_idempotency_key(served: Served) -> None:
    inv = served.send("/trips/carol/hold", key="purge-me")
    served.phase_is(inv, "SUSPENDED")
    status, body = served.control(inv, "purge")
    assert status == 409 and "only a finished invocation can be purged" in body["message"], body
    assert served.http("GET", f"/restate/attach/{inv}")[2] == 1
    r = oncely_cli("invocations", "pause", served.app, inv, "--bootstrap", served.kafka)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"Error: {inv}: pause refused: cannot pause it: it has finished (COMPLETED)"), r.stderr
    assert served.send("/trips/carol/hold", key="purge-me") == inv
    assert served.http("GET", f"/restate/attach/{inv}")[2] == 1  # the same invocation's result: not run again
    assert served.control(inv, "purge") == (200, {"invocation_id": inv, "action": "purge", "status": "applied"})
    assert served.admin("GET", f"/invocations/{inv}", headers=AUTH)[0] == 404
    assert served.send("/trips/carol/hold", key="purge-me") == inv  # the key is free: it runs again
    assert served.http("GET", f"/restate/attach/{inv}")[2] == 2


def test_pause_stays_across_a_restart_then_resume_completes_once(served: Served) -> None:
    inv = served.send("/trips/dave/hold")
    served.phase_is(inv, "SUSPENDED")
    assert served.control(inv, "pause")[0] == 200
    d = served.describe(inv)
    assert d["phase"] == "PAUSED" and d["paused_by_operator"] is True, d
    assert served.proc.stop() == 0
    served.start()
    d = served.describe(inv)
    assert d["phase"] == "PAUSED" and d["paused_by_operator"], d  # not retried on restart
    r = oncely_cli("invocations", "list", served.app, "--phase", "paused", "--bootstrap", served.kafka)
    assert r.returncode == 0 and inv in r.stdout, r.stdout + r.stderr
    assert served.control(inv, "resume")[0] == 200
    assert served.http("GET", f"/restate/attach/{inv}")[2] == 1
    status, _, state = served.http("GET", "/restate/state/trips/dave")
    assert state == {"done": 1}
    status, body = served.control(inv, "resume")
    assert status == 409 and "not PAUSED" in body["message"]


def test_cancel_reaches_the_callee_and_an_inboxed_invocation_is_killed_at_its_turn(served: Served) -> None:
    trip = served.send("/trips/erin/book")
    served.phase_is(trip, "SUSPENDED")
    # Both wait behind trip for erin's key, held in memory: one found by its
    # idempotency key, one (no key) only by a scan of what is held.
    queued = served.send("/trips/erin/hold", key="inboxed-erin")
    held = served.send("/trips/erin/hold")
    served.phase_is(queued, "INBOXED")
    served.phase_is(held, "INBOXED")
    status, _, listed = served.admin("GET", "/invocations?phase=INBOXED&limit=50", headers=AUTH)
    assert status == 200 and {queued, held} <= {d["invocation_id"] for d in listed["invocations"]}, listed
    assert served.control(queued, "kill") == (200, {"invocation_id": queued, "action": "kill", "status": "applied"})
    assert served.control(held, "cancel")[0] == 200
    assert served.describe(held)["cancelled"] is True

    (charge,) = wait_until(lambda: served.charges("erin"), 60, 0.2, "the callee, listed")
    assert served.control(trip, "cancel")[0] == 200  # the caller: the cancel reaches its callee
    status, _, body = served.http("GET", f"/restate/attach/{trip}")
    assert status == 409 and body["message"] == "cancelled", body
    served.phase_is(charge, "FAILED")
    assert served.describe(charge)["error"] == "terminal: cancelled"
    status, _, body = served.http("GET", f"/restate/attach/{queued}")
    assert status == 409 and body["message"].endswith("killed by an operator"), body
    status, _, body = served.http("GET", f"/restate/attach/{held}")
    assert status == 409 and body["message"] == "cancelled", body
    assert served.http("GET", "/restate/state/trips/erin")[2] == {}  # hold never ran
