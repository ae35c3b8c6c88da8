"""The HTTP ingress while Kafka is away: a broker of its own is stopped
under a processor serving `--http` and a standalone `oncely gateway`. Both
must answer 503 with Retry-After within the caller's wait (never hang), and
serve calls again once the broker is back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from oncely.local_kafka import LocalKafka, LocalKafkaError
from oncely.testing import unique_name
from support import ProcessorProcess, wait_until
from test_gateway import SPEC, GatewayProcess, Http, _env, _port

WAIT = 8.0  # the caller's x-oncely-wait
SLACK = 4.0  # what a loaded machine may add to an answer that must come within the wait


@pytest.mark.slow  # a broker of its own, started twice
def test_503_with_retry_after_while_kafka_is_down_then_calls_succeed(tmp_path: Path) -> None:
    broker = LocalKafka(data_dir=tmp_path / "broker")
    bootstrap = broker.start().bootstrap
    app, in_port, gw_port = unique_name("gwdown"), _port(), _port()
    env = _env(app, ONCELY_HTTP=f"127.0.0.1:{in_port}")
    proc = ProcessorProcess(SPEC, bootstrap, tmp_path / "state", env, tmp_path / "p.log")
    gw = None
    try:
        proc.start()
        clients = {"run-http": Http(in_port)}
        clients["run-http"].ready()
        gw = GatewayProcess(bootstrap, _env(app), gw_port, tmp_path / "gw.log")
        clients["gateway"] = Http(gw_port)
        clients["gateway"].ready()
        for name, client in clients.items():
            status, _, body = client("POST", "/counter/up/add", 1)
            assert status == 200, (name, body)

        broker.stop()
        for name, client in clients.items():
            # Until the gateway has found the broker gone, a call is queued
            # (202 after its wait): key `probe`, never checked.
            wait_until(lambda c=client: c("POST", "/counter/probe/add", 1, {"x-oncely-wait": "1"},
                                          timeout=30)[0] == 503, 60, 0.2, f"{name}: a 503 while the broker is down")
            assert client("GET", "/restate/health", timeout=30)[0] == 503, name
            for path in ("/counter/down/add", "/counter/down/add/send", "/greeter/hello"):
                started = time.monotonic()
                status, headers, body = client("POST", path, 1, {"x-oncely-wait": str(WAIT)}, timeout=60)
                took = time.monotonic() - started
                assert status == 503, (name, path, status, body)
                assert headers.get("retry-after", "").isdigit(), (name, path, headers)
                assert "Kafka unavailable" in json.loads(body)["message"], (name, path, body)
                assert took < WAIT + SLACK, (name, path, took)

        try:
            broker.start()
        except LocalKafkaError:  # seen once at load average 46: the restarted broker's startup failed
            broker.start()

        def supervised() -> bool:
            """A processor that gave up on stuck Kafka clients exits 75 by design; its supervisor restarts it."""
            if not proc.alive():
                assert proc.proc is not None and proc.proc.returncode == 75, proc.log_text()[-3000:]
                proc.start()
            return True

        for name, client in clients.items():
            wait_until(lambda c=client: supervised() and c("POST", "/counter/back/add", 1, {"Idempotency-Key": f"back-{name}"},
                                          timeout=60)[0] == 200, 120, 0.5, f"{name}: a call succeeds again")
        state = json.loads(clients["gateway"]("GET", "/restate/state/counter/back")[2])
        assert state["n"] == len(clients), state  # each Idempotency-Key ran once, whatever the retries
        # Refused calls were never taken: nothing ran for key `down`.
        status, _, body = clients["gateway"]("GET", "/restate/state/counter/down")
        assert (status, json.loads(body)) == (200, {}), body
    finally:
        if gw is not None:
            gw.stop()
        proc.stop()
        broker.stop()
