"""`oncely demo --remote`: the enrichment handler behind an HTTP endpoint in
its own process; the endpoint and the processor are both killed -9 and
restarted mid-stream, and the demo's own exactly-once checks pass."""

from __future__ import annotations

from support import oncely_cli


def test_demo_remote_survives_kills_of_endpoint_and_processor(kafka: str) -> None:
    r = oncely_cli("demo", "--remote", "--bootstrap", kafka, "--orders", "400", "--customers", "40", "--kills", "1",
                   timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "handler behind an HTTP endpoint at http://127.0.0.1:" in out
    assert out.count("kill -9 the endpoint and the processor after") == 1, out
    assert "enriched out 400 (twice 0, missing 0, wrong running total or tier 0)" in out, out
    assert out.rstrip().endswith("-> OK"), out
