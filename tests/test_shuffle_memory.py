"""Suspension bounds memory: 50,000 invocations waiting on awakeables cost
the processor's RSS little more than 5,000 do (tests/apps/shuffle.py)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import oncely
from oncely.admin import read_invocations
from oncely.testing import create_topic, unique_name
from oncely.shuffle.ids import format_awakeable, parse_id
from oncely.shuffle.routing import partition_for
from support import ProcessorProcess, changelog_state, wait_for_app_topics, wait_until

SPEC = "tests.apps.shuffle:app"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _send(client: oncely.Client, start: int, end: int) -> list[str]:
    ids = [client.send("waiter", f"m{i}", "hold", None) for i in range(start, end)]
    client.flush()
    return ids


def _loaded_suspended(proc: ProcessorProcess) -> int:
    """Suspended invocations the current run found in its stores (log lines
    "partition N: loaded … , K suspended")."""
    run = proc.log_text().split("===== start #")[-1]
    return sum(int(line.rsplit(", ", 1)[-1].split()[0]) for line in run.splitlines()
               if "in-flight invocations" in line and line.endswith(" suspended"))


def test_rss_stays_bounded_with_50k_suspended_invocations(kafka: str, tmp_path: Path) -> None:
    app, results = unique_name("memory"), unique_name("memory-out")
    create_topic(kafka, results, 1)
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_RESULTS": results, "ONCELY_SUSPEND_AFTER": "0.5"}
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    figures: dict[str, float] = {}
    try:
        wait_for_app_topics(kafka, app)
        client = oncely.Client(kafka, app=app)

        def suspended() -> int:
            return Counter(i.phase for i in read_invocations(kafka, app))["SUSPENDED"]

        first_id = _send(client, 0, 5_000)[7]
        wait_until(lambda: suspended() == 5_000, 180, 2.0, "5,000 suspended")
        time.sleep(1)
        figures["rss_5k"] = _rss_mib(proc.proc.pid)
        _send(client, 5_000, 50_000)
        wait_until(lambda: suspended() == 50_000, 600, 3.0, "50,000 suspended")
        time.sleep(1)
        figures["rss_50k"] = _rss_mib(proc.proc.pid)
        # A restart loads none of them into memory, and they still resume.
        assert proc.stop() == 0
        t0 = time.monotonic()
        proc.start()
        wait_until(lambda: _loaded_suspended(proc) == 50_000, 120, 0.2, "the restart to load its partitions")
        figures["restart_s"] = round(time.monotonic() - t0, 1)
        time.sleep(1)
        figures["rss_50k_restarted"] = _rss_mib(proc.proc.pid)
        key = b"m7"
        awk = format_awakeable(app, partition_for(key, 4), parse_id(first_id), 0)
        oncely.Client(kafka).resolve_awakeable(awk, "late")
        wait_until(lambda: changelog_state(kafka, app).get(("waiter", key, "got")) == "late", 60, 0.5, "m7")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    print(f"\nRSS with suspended invocations: {figures}")
    per_invocation = (figures["rss_50k"] - figures["rss_5k"]) * 1024 * 1024 / 45_000
    # Held in memory (suspension off, backpressure off) a waiting invocation
    # costs about 6.5 KB of RSS (task, coroutine, context, journal, status):
    # 367 MiB at 50,000. Suspended, only RocksDB's memtables (at most 3 x 8
    # MiB per partition) and allocator slack grow: 0.5-1.2 KB in our runs.
    assert per_invocation < 2048, f"{per_invocation:.0f} bytes of RSS per suspended invocation"
    # After a restart none of them is in memory at all.
    assert figures["rss_50k_restarted"] < figures["rss_5k"] + 16
