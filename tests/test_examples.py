"""The README's snippets are the files in examples/, shown verbatim, and
each of them runs against the broker as the README says to run it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import fastavro
import orjson

from oncely.testing import read_to_end
from support import REPO, ProcessorProcess, changelog_state, oncely_cli, wait_for_app_topics, wait_until

EXAMPLES = REPO / "examples"
SHOWN = ["quickstart.py", "subscriptions.py", "emit.py", "audit.avsc", "messages.py", "test_quickstart_unit.py"]
MARKER = re.compile(r"<!-- (examples/[\w.]+) -->\n```\w*\n(.*?)```\n", re.S)


def test_the_readme_shows_each_example_file_verbatim() -> None:
    shown = {name: body for name, body in MARKER.findall((REPO / "README.md").read_text())}
    assert sorted(shown) == sorted(f"examples/{f}" for f in SHOWN)
    for name, body in shown.items():
        assert body == (REPO / name).read_text(), f"README's copy of {name} differs from the file"


def _processor(spec: str, kafka: str, tmp_path: Path) -> ProcessorProcess:
    return ProcessorProcess(spec, kafka, tmp_path / "state", {}, tmp_path / "p.log", cwd=EXAMPLES).start()


def _ok(*args: str, kafka: str, stdin: str | None = None) -> str:
    out = oncely_cli(*args, env={"ONCELY_KAFKA_BOOTSTRAP": kafka}, cwd=EXAMPLES, stdin=stdin)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _script(name: str, kafka: str) -> None:
    """`python3 NAME` in examples/, as the README runs it."""
    run = subprocess.run([sys.executable, name], cwd=EXAMPLES, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ONCELY_KAFKA_BOOTSTRAP": kafka})
    assert run.returncode == 0, run.stderr


def _state(kafka: str, app: str, service: str, key: str) -> dict[str, object]:
    return {n: v for (s, k, n), v in changelog_state(kafka, app).items() if s == service and k == key.encode()}


def test_quickstart(kafka: str, tmp_path: Path) -> None:
    proc = _processor("quickstart:app", kafka, tmp_path)
    try:
        wait_for_app_topics(kafka, "shop")
        before = _state(kafka, "shop", "counter", "alice").get("n", 0)
        _script("quickstart.py", kafka)
        wait_until(lambda: _state(kafka, "shop", "counter", "alice").get("last_receipt") == "receipt-4242-30", 60,
                   0.5, "the charge")
        # +10 on a fresh broker; +5 when order-17 was sent within the day (a reused cluster).
        assert _state(kafka, "shop", "counter", "alice")["n"] in (before + 10, before + 5)
        assert "counter alice n = " in _ok("inspect", "state", "shop", kafka=kafka)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def _order(kafka: str, customer: str, amount: int, copies: int = 1) -> str:
    """Produce an order to `orders` with `oncely produce`, `copies` times
    (as a retrying producer would); returns its id."""
    oid = f"o-{uuid.uuid4().hex[:8]}"
    value = orjson.dumps({"id": oid, "customer": customer, "amount": amount}).decode()
    for _ in range(copies):
        _ok("produce", "orders", "--key", customer, "--value", value, "--header", f"Idempotency-Key={oid}",
            kafka=kafka)
    return oid


def test_subscriptions(kafka: str, tmp_path: Path) -> None:
    _ok("topics", "create", "orders", "--partitions", "4", kafka=kafka)
    proc = _processor("subscriptions:app", kafka, tmp_path)
    customer = f"alice-{uuid.uuid4().hex[:6]}"
    try:
        wait_for_app_topics(kafka, "order-totals")
        _order(kafka, customer, 5, copies=2)  # a producer's retry: the same Idempotency-Key is processed once
        _ok("produce", "orders", "--value", "not json", kafka=kafka)
        wait_until(lambda: _state(kafka, "order-totals", "customers", customer).get("total") == 5, 60, 0.5, "total")
        dead = wait_until(lambda: "oncely.reason: undecodable" in (t := _ok("tail", "--dlq", "order-totals",
                                                                          kafka=kafka)) and t, 60, 0.5, "the DLQ")
        assert "  not json" in dead
        assert proc.stop() == 0
        assert _state(kafka, "order-totals", "customers", customer)["total"] == 5
    finally:
        if proc.alive():
            proc.kill9()


def test_emit(kafka: str, tmp_path: Path) -> None:
    _ok("topics", "create", "orders", "--partitions", "4", kafka=kafka)
    proc = _processor("emit:app", kafka, tmp_path)
    customer = f"bob-{uuid.uuid4().hex[:6]}"
    try:
        wait_for_app_topics(kafka, "order-audit")
        oid = _order(kafka, customer, 7)

        def mine(topic: str) -> list:
            return [r for r in read_to_end(kafka, topic) if r.key == customer.encode()]

        enriched = wait_until(lambda: mine("enriched-orders"), 60, 0.5, "the enriched order")
        assert orjson.loads(enriched[0].value) == {"id": oid, "customer": customer, "amount": 7, "total": 7}
        assert enriched[0].header("source") == b"oncely"
        schema = fastavro.parse_schema(orjson.loads((EXAMPLES / "audit.avsc").read_bytes()))
        audits = [fastavro.schemaless_reader(io.BytesIO(r.value), schema, None) for r in read_to_end(kafka, "audit")]
        assert {"order": oid, "customer": customer, "amount": 7} in audits
        assert [r.value for r in mine("raw")] == [f"{oid}:7".encode()]
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_messages(kafka: str, tmp_path: Path) -> None:
    proc = _processor("messages:app", kafka, tmp_path)
    try:
        wait_for_app_topics(kafka, "checkout")
        pending = _state(kafka, "checkout", "approvals", "alice").get("pending")
        _script("messages.py", kafka)
        awk = wait_until(lambda: (p := _state(kafka, "checkout", "approvals", "alice").get("pending")) != pending
                         and p, 60, 0.5, "the approval request")
        assert "send carts/expire key=alice" in _ok("inspect", "timers", "checkout", kafka=kafka)
        assert _ok("awakeable", "resolve", str(awk), "true", kafka=kafka).strip() == "ok"
        status = wait_until(lambda: str(_state(kafka, "checkout", "orders", "alice").get("status", "")).endswith(
            "approved") and _state(kafka, "checkout", "orders", "alice")["status"], 60, 0.5, "the approval")
        assert ", 23 EUR): approved" in str(status)
        assert _state(kafka, "checkout", "stock", "book")["reserved"] >= 1
        wait_until(lambda: _ok("inspect", "invocations", "checkout", kafka=kafka).strip() == "no invocations", 30,
                   0.5, "no invocation left in flight")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def test_the_unit_test_example_passes_without_kafka() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ONCELY_KAFKA_BOOTSTRAP"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_quickstart_unit.py"],
                         cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout
