"""The durable inbox bounds memory: invocations that cannot start wait in the
store, not in memory, and the log is never paused (tests/apps/inbox.py).

At max_inflight_per_partition=20: 50,000 invocations of one hot key queue
behind its lock, and 10,000 callers queue for capacity while each needs a
callee that is queued behind them on the same log partitions (the case that
deadlocked a paused log before the inbox). All finish with exact results,
and the processor's RSS stays bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

import oncely
from oncely.testing import create_topic, read_to_end, unique_name
from support import ProcessorProcess, changelog_state, wait_for_app_topics

SPEC = "tests.apps.inbox:app"
HOT, CALLERS = 50_000, 10_000


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_hot_key_and_caller_backlog_finish_with_bounded_memory(kafka: str, tmp_path: Path) -> None:
    app, results = unique_name("inbox"), unique_name("inbox-out")
    create_topic(kafka, results, 1)
    env = {"ONCELY_TEST_APP": app, "ONCELY_TEST_RESULTS": results, "ONCELY_MAX_INFLIGHT_PER_PARTITION": "20"}
    proc = ProcessorProcess(SPEC, kafka, tmp_path / "state", env, tmp_path / "p.log").start()
    rss: list[float] = []
    try:
        wait_for_app_topics(kafka, app)
        time.sleep(2)
        idle_rss = _rss_mib(proc.proc.pid)
        client = oncely.Client(kafka, app=app)
        for n in range(HOT):
            client.send("hot", "h", "add", n)
        for n in range(CALLERS):
            client.send("caller", f"c{n}", "go", n)
        client.flush()
        t0 = time.monotonic()
        callers_done = hot_done = 0
        while time.monotonic() - t0 < 600:
            rss.append(_rss_mib(proc.proc.pid))
            outs = [orjson.loads(r.value) for r in read_to_end(kafka, results, timeout=60)]
            callers_done = sum(1 for o in outs if "caller" in o)
            hot_done = max((o["hot"] for o in outs if "hot" in o), default=0)
            if callers_done >= CALLERS and hot_done >= HOT:
                break
            assert proc.alive(), proc.log_text()[-3000:]
            time.sleep(2)
        elapsed = time.monotonic() - t0
        rss.append(_rss_mib(proc.proc.pid))
        assert (callers_done, hot_done) == (CALLERS, HOT), f"not finished in {elapsed:.0f} s"
        state = changelog_state(kafka, app)
        assert state[("hot", b"h", "count")] == HOT
        assert state[("hot", b"h", "sum")] == sum(range(HOT))
        assert all(state[("caller", f"c{n}".encode(), "result")] == 2 * n for n in range(CALLERS))
        assert sum(v for (svc, _, name), v in state.items() if svc == "leaf" and name == "calls") == CALLERS
        log = proc.log_text()
        assert "Traceback" not in log, log[-3000:]
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    print(f"\ninbox: {HOT} hot-key + {CALLERS} callers in {elapsed:.1f} s; RSS idle {idle_rss:.0f} MiB, "
          f"max {max(rss):.0f} MiB")
    # Queued in the store, they cost RocksDB memtables and allocator slack:
    # +45-50 MiB in our runs. Without the in-memory limit (every caller
    # started and waiting in memory, ~6.5 KB each) the same run grew by
    # 115 MiB; the old paused log by 90 MiB.
    assert max(rss) < idle_rss + 100, f"RSS grew from {idle_rss:.0f} to {max(rss):.0f} MiB"
