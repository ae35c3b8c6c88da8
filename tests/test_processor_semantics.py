"""Keyed exclusivity and order, concurrency across keys, stateless services,
state visibility, topic checks and configuration errors, on a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

import oncely
from oncely.testing import read_to_end, unique_name
from support import InProcessProcessor, changelog_state, wait_until


def test_keyed_invocations_run_one_at_a_time_in_log_order(kafka: str, tmp_path: Path) -> None:
    name = unique_name("order")
    app = oncely.App(name, partitions=4, bootstrap=kafka, state_dir=str(tmp_path))
    seq = app.keyed("seq")
    running: dict[str, int] = {}
    overlaps: list[str] = []
    live = {"now": 0, "max": 0}

    @seq.handler
    async def append(ctx: oncely.Context, item: int) -> None:
        key = ctx.key
        running[key] = running.get(key, 0) + 1
        live["now"] += 1
        live["max"] = max(live["max"], live["now"])
        if running[key] > 1:
            overlaps.append(key)
        items = ctx.get("items", [])
        await asyncio.sleep(0.002 * (item % 3))  # a lost update would show if two ran at once
        ctx.set("items", items + [item])
        running[key] -= 1
        live["now"] -= 1

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        for i in range(300):
            for k in range(20):
                client.send(append, f"k{k}", i)
        client.flush()
        expected = {f"k{k}".encode(): list(range(300)) for k in range(20)}
        wait_until(lambda: {k: v for (_, k, n), v in changelog_state(kafka, name).items() if n == "items"}
                   == expected, 120, 1.0, "every key's items in send order")
    finally:
        runner.stop()
    assert overlaps == [], "two invocations of one key ran at the same time"
    assert live["max"] > 1, "invocations of different keys never ran concurrently"


def test_stateless_service_runs_concurrently_and_has_no_state(kafka: str, tmp_path: Path) -> None:
    name = unique_name("stateless")
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path),
                     retry=oncely.RetryPolicy(max_attempts=1))
    svc = app.service("enricher")
    gate = {"live": 0, "max": 0, "done": 0}

    @svc.handler
    async def enrich(ctx: oncely.Context, x: int) -> int:
        gate["live"] += 1
        gate["max"] = max(gate["max"], gate["live"])
        await asyncio.sleep(0.05)
        gate["live"] -= 1
        gate["done"] += 1
        assert ctx.key is None
        return x * 2

    @svc.handler
    async def touch_state(ctx: oncely.Context) -> None:
        ctx.get("x")

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        for i in range(50):
            client.send(enrich, i)
        client.send(touch_state)
        client.flush()
        wait_until(lambda: gate["done"] == 50, 60, 0.2, "all enrich invocations")
        dead = wait_until(lambda: read_to_end(kafka, f"{name}.dlq"), 60, 0.5, "the dead letter of touch_state")
    finally:
        runner.stop()
    assert gate["max"] > 1, "stateless invocations never overlapped"
    assert len(dead) == 1 and b"is stateless" in dead[0].header("oncely.error")


def test_unknown_handler_goes_to_the_dlq_and_processing_continues(kafka: str, tmp_path: Path) -> None:
    name = unique_name("unknown")
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path))
    counter = app.keyed("counter")

    @counter.handler
    async def add(ctx: oncely.Context, n: int) -> None:
        ctx.set("n", ctx.get("n", 0) + n)

    runner = InProcessProcessor(app).start()
    try:
        client = oncely.Client(kafka, app=name)
        client.send("counter", "a", "nope", 1)
        client.send("missing", "a", "add", 1)
        client.send("counter", "a", "add", 5)
        client.flush()
        wait_until(lambda: changelog_state(kafka, name).get(("counter", b"a", "n")) == 5, 60, 0.5, "the good one")
        dead = wait_until(lambda: (d := read_to_end(kafka, f"{name}.dlq")) and len(d) == 2 and d, 30, 0.5, "2 dead")
    finally:
        runner.stop()
    assert {d.header("oncely.reason") for d in dead} == {b"unknown-handler"}
    assert {d.header("oncely.target") for d in dead} == {b"counter/nope", b"missing/add"}


def test_existing_topics_with_other_partition_counts_refuse_to_start(kafka: str, tmp_path: Path) -> None:
    name = unique_name("mismatch")
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.create_topics([NewTopic(f"{name}.log", 3, 1)])[f"{name}.log"].result(30)
    app = oncely.App(name, partitions=8, bootstrap=kafka, state_dir=str(tmp_path))
    with pytest.raises(oncely.ConfigError, match=r"has 3 partitions but App\('.*', partitions=8\) expects 8"):
        InProcessProcessor(app).start()


def test_changelog_that_is_not_compacted_refuses_to_start(kafka: str, tmp_path: Path) -> None:
    name = unique_name("nocompact")
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.create_topics([NewTopic(f"{name}.changelog", 2, 1, config={"cleanup.policy": "delete"})])[
        f"{name}.changelog"].result(30)
    app = oncely.App(name, partitions=2, bootstrap=kafka, state_dir=str(tmp_path))
    with pytest.raises(oncely.ConfigError, match="must be compacted"):
        InProcessProcessor(app).start()


def test_topics_are_created_with_the_right_configs(kafka: str, tmp_path: Path) -> None:
    from confluent_kafka.admin import ConfigResource

    name = unique_name("topics")
    app = oncely.App(name, partitions=3, bootstrap=kafka, state_dir=str(tmp_path))
    InProcessProcessor(app).start().stop()
    admin = AdminClient({"bootstrap.servers": kafka})
    md = admin.list_topics(timeout=10)
    assert len(md.topics[f"{name}.log"].partitions) == 3
    assert len(md.topics[f"{name}.changelog"].partitions) == 3
    assert len(md.topics[f"{name}.dlq"].partitions) == 1
    res = [ConfigResource(ConfigResource.Type.TOPIC, f"{name}.{t}") for t in ("log", "changelog", "dlq")]
    got = {r.name: c.result(30) for r, c in admin.describe_configs(res).items()}
    assert got[f"{name}.changelog"]["cleanup.policy"].value == "compact"
    assert got[f"{name}.log"]["cleanup.policy"].value == "delete"
    assert int(got[f"{name}.log"]["retention.ms"].value) >= 7 * 24 * 3600 * 1000


def test_second_process_on_one_state_dir_is_refused(kafka: str, tmp_path: Path) -> None:
    name = unique_name("lock")
    app = oncely.App(name, partitions=1, bootstrap=kafka, state_dir=str(tmp_path))
    first = InProcessProcessor(app).start()
    try:
        with pytest.raises(oncely.ConfigError, match="in use by another oncely process"):
            InProcessProcessor(oncely.App(name, partitions=1, bootstrap=kafka, state_dir=str(tmp_path))).start()
    finally:
        first.stop()


def test_reserved_kafka_settings_are_refused(kafka: str, tmp_path: Path) -> None:
    app = oncely.App(unique_name("reserved"), partitions=1, bootstrap=kafka, state_dir=str(tmp_path),
                     kafka={"isolation.level": "read_uncommitted"})
    with pytest.raises(oncely.ConfigError, match="set by oncely itself"):
        InProcessProcessor(app).start()
