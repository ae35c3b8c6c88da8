"""pytest plugin: a real Kafka broker for integration tests of oncely apps.

Installed with oncely (entry point `pytest11`), so any project that depends on
oncely gets these fixtures:

- `kafka` (session): a bootstrap address. Taken from ONCELY_KAFKA_BOOTSTRAP when
  set (an existing cluster); else a broker in Docker via testcontainers when a
  Docker engine answers; else the local JVM broker (`oncely.local_kafka`),
  started once per session in a temporary data dir and stopped at the end.
- `kafka_topic`: a factory creating a uniquely named topic for this test.

and these helpers: `create_topic`, `produce`, `read_to_end` (read_committed by
default), `Record`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Literal

import pytest

from oncely.kafka_io import Record, create_topic, produce, read_to_end, unique_name
from oncely.local_kafka import KAFKA_VERSION, LocalKafka, free_port

KafkaSource = Literal["env", "testcontainers", "local"]


def choose_kafka_source(env: dict[str, str], docker_answers: Callable[[], bool]) -> KafkaSource:
    """Pick where the test broker comes from. `docker_answers` is only asked
    when no cluster is given, because asking costs a connection attempt."""
    if env.get("ONCELY_KAFKA_BOOTSTRAP", "").strip():
        return "env"
    if env.get("ONCELY_TEST_NO_DOCKER", "") not in ("", "0"):
        return "local"
    return "testcontainers" if docker_answers() else "local"


def docker_engine_answers(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping (DOCKER_HOST or the default socket)."""
    try:
        import docker  # testcontainers' dependency
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def apache_kafka_container(image: str | None = None, docker_client_kw: dict[str, Any] | None = None):
    """The official apache/kafka image (same version as the local broker) in
    KRaft mode, run by testcontainers.

    testcontainers' own Kafka module is built around Confluent's cp-kafka image
    scripts; oncely tests against Apache Kafka itself, so it drives the official
    image through testcontainers' DockerContainer with the image's documented
    KAFKA_* settings. The host port is fixed and advertised as such, so clients
    outside the container reach the broker at the address it advertises.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    port = free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://localhost:{port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "4",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "4",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_TRANSACTION_ABORT_TIMED_OUT_TRANSACTION_CLEANUP_INTERVAL_MS": "1000",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_LOG_CLEANER_BACKOFF_MS": "1000",
    }
    container = DockerContainer(image or f"apache/kafka:{KAFKA_VERSION}", docker_client_kw=docker_client_kw)
    container.with_bind_ports(port, port)
    for k, v in env.items():
        container.with_env(k, v)
    container.waiting_for(LogMessageWaitStrategy(re.compile(r"Kafka Server started")).with_startup_timeout(120))
    return container, f"localhost:{port}"


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap address of a real Kafka broker for this test session."""
    source = choose_kafka_source(dict(os.environ), docker_engine_answers)
    if source == "env":
        yield os.environ["ONCELY_KAFKA_BOOTSTRAP"].strip()
        return
    if source == "testcontainers":
        container, bootstrap = apache_kafka_container()
        container.start()
        try:
            yield bootstrap
        finally:
            container.stop()
        return
    data_dir = tempfile.mkdtemp(prefix="oncely-test-kafka-")
    broker = LocalKafka(data_dir=data_dir)
    info = broker.start()
    try:
        yield info.bootstrap
    finally:
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def kafka_topic(kafka: str, request: pytest.FixtureRequest) -> Callable[..., str]:
    """Factory: `kafka_topic(partitions=1, config=None, prefix=<test name>)`
    creates a uniquely named topic and returns its name."""

    def make(partitions: int = 1, config: dict[str, str] | None = None, prefix: str | None = None) -> str:
        base = re.sub(r"[^a-zA-Z0-9._-]", "-", prefix or request.node.name)[:60]
        return create_topic(kafka, unique_name(base), partitions, config)

    return make



__all__ = [
    "Record", "apache_kafka_container", "choose_kafka_source", "create_topic", "docker_engine_answers", "kafka",
    "kafka_topic", "produce", "read_to_end", "unique_name",
]


from oncely.driver import TestDriver  # noqa: E402  (the unit-test driver, re-exported)

__all__ = ["TestDriver", "choose_kafka_source", "create_topic", "produce", "read_to_end", "unique_name", "Record"]
