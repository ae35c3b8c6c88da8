"""The local broker launcher (`oncely kafka start|status|stop`) and the pytest
plugin's choice of broker.

The CLI tests run the installed `oncely` console script as a real subprocess,
because the broker it starts must outlive the CLI process, and they run a real
JVM broker in a data dir under tmp_path. Every broker a test starts is stopped
by the `brokers` fixture's teardown.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from oncely.local_kafka import KAFKA_VERSION, LocalKafka
from oncely.testing import apache_kafka_container, choose_kafka_source, create_topic

# -- choose_kafka_source ------------------------------------------------------


def _docker_must_not_be_asked() -> bool:
    raise AssertionError("docker_answers() was called although the source was already decided")


def test_env_bootstrap_wins_and_docker_is_not_asked():
    env = {"ONCELY_KAFKA_BOOTSTRAP": "broker.example:9092"}
    assert choose_kafka_source(env, _docker_must_not_be_asked) == "env"


def test_blank_env_bootstrap_counts_as_unset():
    assert choose_kafka_source({"ONCELY_KAFKA_BOOTSTRAP": "  "}, lambda: False) == "local"


def test_docker_answering_means_testcontainers():
    asked = []

    def docker_answers() -> bool:
        asked.append(True)
        return True

    assert choose_kafka_source({}, docker_answers) == "testcontainers"
    assert asked == [True]


def test_no_docker_means_local_broker():
    assert choose_kafka_source({}, lambda: False) == "local"


def test_no_docker_opt_out_skips_the_docker_probe():
    assert choose_kafka_source({"ONCELY_TEST_NO_DOCKER": "1"}, _docker_must_not_be_asked) == "local"
    assert choose_kafka_source({"ONCELY_TEST_NO_DOCKER": "0"}, lambda: True) == "testcontainers"


# -- apache_kafka_container ---------------------------------------------------


# testcontainers' DockerContainer builds a docker-py client, which asks the
# engine for its API version unless one is pinned; pinning it lets the
# container be constructed (not started) on a machine without an engine.
NO_HANDSHAKE = {"version": "1.44"}


def test_apache_kafka_container_advertises_its_bootstrap_port():
    container, bootstrap = apache_kafka_container(docker_client_kw=NO_HANDSHAKE)
    host, _, port_s = bootstrap.rpartition(":")
    port = int(port_s)
    assert host == "localhost"

    assert container.image.endswith(f"apache/kafka:{KAFKA_VERSION}")
    assert container.image.split("/")[-1] == f"kafka:{KAFKA_VERSION}"
    # The broker listens on the same port inside the container that is bound
    # on the host and advertises exactly the address the tests are given.
    assert container.ports == {str(port): port}
    assert container.env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{bootstrap}"
    assert f"PLAINTEXT://0.0.0.0:{port}" in container.env["KAFKA_LISTENERS"].split(",")
    assert container.env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert container._container is None  # constructed, not started


def test_container_and_local_broker_share_the_settings_oncely_relies_on(tmp_path):
    container, _ = apache_kafka_container(docker_client_kw=NO_HANDSHAKE)
    local = LocalKafka(data_dir=tmp_path / "cfg", cache_dir=tmp_path / "cache")
    local.data_dir.mkdir()
    props = dict(
        line.split("=", 1)
        for line in local._write_config(19092, 19093).read_text().splitlines()
        if line and not line.startswith("#")
    )
    for key in [
        "auto.create.topics.enable",
        "group.initial.rebalance.delay.ms",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "transaction.abort.timed.out.transaction.cleanup.interval.ms",
    ]:
        env_key = "KAFKA_" + key.upper().replace(".", "_")
        assert container.env.get(env_key) == props[key], key


def test_apache_kafka_container_accepts_another_image():
    container, _ = apache_kafka_container(image="apache/kafka:9.9.9", docker_client_kw=NO_HANDSHAKE)
    assert container.image.endswith("apache/kafka:9.9.9")


# -- the CLI, end to end ------------------------------------------------------


def _oncely() -> list[str]:
    """The installed console script next to this interpreter (a pyenv shim
    found on PATH would itself need PATH), else the CLI module."""
    script = Path(sys.executable).parent / "oncely"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from oncely.cli import main; main()"]


def _env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def oncely(*args: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_oncely(), *map(str, args)],
        capture_output=True, text=True, env=env or _env(), timeout=180, stdin=subprocess.DEVNULL,
    )


def _alive(pid: int) -> bool:
    """True while `pid` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and _alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def _bin_dir(path: Path, *tools: str) -> Path:
    """A directory holding symlinks to just `tools`, to use as PATH."""
    path.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} is needed on PATH for this test"
        (path / tool).symlink_to(found)
    return path


@pytest.fixture
def brokers():
    """Data dirs of brokers a test may start; each one is stopped at teardown,
    whatever the test did."""
    dirs: list[Path] = []
    yield dirs
    for d in dirs:
        broker = LocalKafka(data_dir=d)
        info = broker.status()
        broker.stop(timeout=20)
        if info and _alive(info.pid):  # stop() failed: do not leak a JVM
            try:
                os.killpg(info.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15).topics)


def test_cli_start_status_stop_twice(tmp_path, brokers):
    data = tmp_path / "broker"
    brokers.append(data)
    broker = LocalKafka(data_dir=data)  # default (warm) cache dir
    topic = f"survives-restart-{uuid.uuid4().hex[:8]}"
    no_mvn_path = str(_bin_dir(tmp_path / "java-only-bin", "java"))
    addresses = []

    for round_ in (1, 2):
        env = _env()
        if round_ == 2:
            # The first start left the jars in the cache: the second must not
            # run Maven, so it gets a PATH on which there is no Maven at all.
            assert broker.jars_cached()
            marker = broker.libs_dir / ".complete"
            marker_mtime = marker.stat().st_mtime_ns
            env = _env(PATH=no_mvn_path, JAVA_HOME=None)

        started = oncely("kafka", "start", "--data-dir", data, env=env)
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", bootstrap), started.stdout
        assert f"Apache Kafka {KAFKA_VERSION} started in" in started.stderr
        if round_ == 2:
            assert "downloading" not in started.stderr
            assert marker.stat().st_mtime_ns == marker_mtime
        addresses.append(bootstrap)

        info = broker.status()
        assert info is not None and info.bootstrap == bootstrap
        pid = info.pid
        assert _alive(pid)
        if round_ == 1:
            create_topic(bootstrap, topic)
        assert topic in _topics(bootstrap)  # a real broker, and its data survived the restart

        again = oncely("kafka", "start", "--data-dir", data)
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr
        assert again.stdout.strip() == bootstrap
        assert broker.status().pid == pid

        status = oncely("kafka", "status", "--data-dir", data)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith(f"running: {bootstrap}")
        assert f"pid {pid}" in status.stdout

        stopped = oncely("kafka", "stop", "--data-dir", data)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == "stopped"
        assert not _alive(pid)
        assert _processes_mentioning(str(data)) == []

        status = oncely("kafka", "status", "--data-dir", data)
        assert status.returncode == 1
        assert status.stdout.strip() == "not running"
        stopped = oncely("kafka", "stop", "--data-dir", data)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "not running"

    assert addresses[0] == addresses[1]  # a restart keeps its address


# -- clear errors -------------------------------------------------------------


def test_port_in_use_is_named(tmp_path, brokers):
    data = tmp_path / "busy"
    brokers.append(data)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        result = oncely("kafka", "start", "--port", port, "--data-dir", data)
    assert result.returncode != 0
    assert f"Port {port}" in result.stderr
    assert "already in use" in result.stderr
    assert LocalKafka(data_dir=data).status() is None
    assert _processes_mentioning(str(data)) == []


def test_missing_java_is_explained(tmp_path, brokers):
    data, cache = tmp_path / "data", tmp_path / "cold-cache"
    brokers.append(data)
    env = _env(PATH=str(_bin_dir(tmp_path / "empty-bin")), JAVA_HOME=None)
    result = oncely("kafka", "start", "--data-dir", data, "--cache-dir", cache, env=env)
    assert result.returncode != 0
    assert "downloading" not in result.stderr  # Java is checked before any download is announced
    assert "Java is missing" in result.stderr
    assert "JDK 17" in result.stderr
    assert not LocalKafka(data_dir=data, cache_dir=cache).jars_cached()


def test_missing_maven_with_a_cold_cache_is_explained(tmp_path, brokers):
    data, cache = tmp_path / "data", tmp_path / "cold-cache"
    brokers.append(data)
    env = _env(PATH=str(_bin_dir(tmp_path / "java-only-bin", "java")), JAVA_HOME=None)
    result = oncely("kafka", "start", "--data-dir", data, "--cache-dir", cache, env=env)
    assert result.returncode != 0
    assert "Maven is missing" in result.stderr
    assert "Java" not in result.stderr.split("Maven is missing")[0]  # Java was found
    assert not LocalKafka(data_dir=data, cache_dir=cache).jars_cached()


def test_broker_dying_during_start_shows_its_log(tmp_path, brokers):
    data = tmp_path / "foreign"
    brokers.append(data)
    # Storage that belongs to another node: the real broker refuses to start.
    (data / "logs").mkdir(parents=True)
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    directory_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    (data / "logs" / "meta.properties").write_text(
        f"version=1\nnode.id=7\ncluster.id={cluster_id}\ndirectory.id={directory_id}\n"
    )
    result = oncely("kafka", "start", "--data-dir", data)
    assert result.returncode != 0
    assert "The broker exited with code" in result.stderr
    assert str(data / "broker.log") in result.stderr
    # The tail of the broker's own log says why.
    assert "Stored node id 7 doesn't match previous node id 1" in result.stderr
    assert LocalKafka(data_dir=data).status() is None
    assert _processes_mentioning(str(data)) == []
