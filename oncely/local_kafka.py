"""A real, single-node Apache Kafka (KRaft) broker on loopback, run from the
pinned release's jars on the machine's JDK.

Tests, the demo and development need a real broker, and a machine without a
Docker engine still has Java and Maven. Maven resolves the jars of one pinned
Apache Kafka release from Maven Central into a cache that later runs reuse,
so only the first start downloads anything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from oncely.kafka_jars import KAFKA_VERSION, LocalKafkaError, check_java, resolve_jars

_LOG4J2 = """rootLogger.level=INFO
rootLogger.appenderRef.out.ref=out
appender.out.type=Console
appender.out.name=out
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.state.name=state.change.logger
logger.state.level=WARN
"""

__all__ = ["KAFKA_VERSION", "BrokerInfo", "LocalKafka", "LocalKafkaError", "check_java", "free_port"]


@dataclass
class BrokerInfo:
    pid: int
    port: int
    controller_port: int
    data_dir: str
    log_file: str
    version: str = KAFKA_VERSION

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def new_cluster_id() -> str:
    """16 random bytes in URL-safe base64 without padding, as KRaft wants.
    Never starting with '-', which a command line would take for an option."""
    import base64

    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def default_cache_dir() -> Path:
    env = os.environ.get("ONCELY_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "oncely"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join(text[-lines:])


class LocalKafka:
    """Start, stop and inspect one local broker whose state lives in `data_dir`.

    The broker outlives the Python process that started it (it runs in its own
    session) so that `oncely kafka start` can return; `stop()` ends it.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        port: int | None = None,
        heap: str = "768m",
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.data_dir = Path(data_dir) if data_dir else self.cache_dir / "kafka-data"
        self.port = port
        self.heap = heap

    # -- jars -----------------------------------------------------------------

    @property
    def libs_dir(self) -> Path:
        return self.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"

    def jars_cached(self) -> bool:
        return (self.libs_dir / ".complete").exists()

    def ensure_jars(self) -> Path:
        """Resolve the pinned release's jars with Maven, once."""
        return resolve_jars(self.libs_dir)

    # -- state ----------------------------------------------------------------

    @property
    def info_file(self) -> Path:
        return self.data_dir / "oncely-broker.json"

    def _read_info(self) -> BrokerInfo | None:
        try:
            return BrokerInfo(**json.loads(self.info_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def status(self) -> BrokerInfo | None:
        """The running broker of this data dir, or None. The pid must still be
        a Kafka JVM started on this data dir's config: a pid reused by another
        process after a reboot or crash is not our broker."""
        info = self._read_info()
        if info and _pid_alive(info.pid) and _is_our_broker(info.pid, self.data_dir):
            return info
        return None

    def _forget(self) -> None:
        try:
            self.info_file.unlink()
        except FileNotFoundError:
            pass

    # -- lifecycle ------------------------------------------------------------

    def _choose_ports(self) -> tuple[int, int]:
        """Prefer the ports of the previous start, so a restarted broker keeps
        its address."""
        try:
            previous = BrokerInfo(**json.loads((self.data_dir / "oncely-ports.json").read_text()))
        except (OSError, ValueError, TypeError):
            previous = None
        if self.port is not None:
            if not port_is_free(self.port):
                raise LocalKafkaError(
                    f"Port {self.port} on 127.0.0.1 is already in use: stop what listens there, "
                    "pick another with --port, or omit --port to use a free one."
                )
            port = self.port
        elif previous and port_is_free(previous.port):
            port = previous.port
        else:
            port = free_port()
        if previous and previous.controller_port != port and port_is_free(previous.controller_port):
            cport = previous.controller_port
        else:
            cport = free_port()
            while cport == port:
                cport = free_port()
        return port, cport

    def _write_config(self, port: int, cport: int) -> Path:
        logs = self.data_dir / "logs"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(logs),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A dead process's open transaction is aborted soon after its
            # transaction.timeout.ms, not up to 10 s later.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
            # Topics are created on purpose (oncely creates its own), so a
            # typo'd topic name is an error instead of a new topic.
            "auto.create.topics.enable": "false",
            "log.cleaner.backoff.ms": "1000",
        }
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
        return path

    def _java_cmd(self, java: str, main: str, *args: str) -> list[str]:
        return [
            java, f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp", str(self.libs_dir / "*"), main, *args,
        ]

    def _format(self, java: str, config: Path) -> None:
        if (self.data_dir / "logs" / "meta.properties").exists():
            return
        cluster_id = (self.data_dir / "cluster.id")
        if not cluster_id.exists() or cluster_id.read_text().startswith("-"):
            cluster_id.write_text(new_cluster_id())
        proc = subprocess.run(
            self._java_cmd(java, "kafka.tools.StorageTool", "format",
                           f"--cluster-id={cluster_id.read_text().strip()}", f"--config={config}"),
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise LocalKafkaError(
                f"Formatting the broker's storage in {self.data_dir / 'logs'} failed:\n"
                + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            )

    def start(self, timeout: float = 90.0) -> BrokerInfo:
        """Start the broker (or return the one already running) and wait until
        it answers a metadata request."""
        running = self.status()
        if running:
            if _answers(running.bootstrap, 5.0):
                return running
            raise LocalKafkaError(
                f"A broker process (pid {running.pid}) owns {self.data_dir} but does not answer on "
                f"{running.bootstrap}; run `oncely kafka stop` (data dir {self.data_dir}) and start again."
            )
        java = check_java()
        self.ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port, cport = self._choose_ports()
        config = self._write_config(port, cport)
        self._format(java, config)
        log_file = self.data_dir / "broker.log"
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(
                self._java_cmd(java, "kafka.Kafka", str(config)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.data_dir,
            )
        info = BrokerInfo(pid=proc.pid, port=port, controller_port=cport,
                          data_dir=str(self.data_dir), log_file=str(log_file))
        self.info_file.write_text(json.dumps(asdict(info)))
        (self.data_dir / "oncely-ports.json").write_text(json.dumps(asdict(info)))
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._forget()
                raise LocalKafkaError(
                    f"The broker exited with code {code} while starting. Last lines of {log_file}:\n{_tail(log_file)}"
                )
            if _answers(info.bootstrap, 1.0):
                return info
            if time.monotonic() > deadline:
                self._kill(proc.pid)
                self._forget()
                raise LocalKafkaError(
                    f"The broker did not answer on {info.bootstrap} within {timeout:.0f} s. "
                    f"Last lines of {log_file}:\n{_tail(log_file)}"
                )
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after `timeout`).
        Returns False when none was running."""
        info = self.status()
        if not info:
            self._forget()
            return False
        self._kill(info.pid, timeout)
        self._forget()
        return True

    @staticmethod
    def _kill(pid: int, timeout: float = 30.0) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if not _pid_alive(pid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        while _pid_alive(pid):
            _reap(pid)
            time.sleep(0.05)


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return True  # no /proc (not Linux): trust the pid
    config = str(data_dir / "server.properties").encode()
    return b"kafka.Kafka" in argv and config in argv


def _reap(pid: int) -> None:
    """Collect the exit status when the broker is our own child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _answers(bootstrap: str, timeout: float) -> bool:
    """True when a broker at `bootstrap` answers a metadata request."""
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout, 1.0)):
            pass
    except OSError:
        return False
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "logger": _silent_logger()})
    try:
        md = admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return bool(md.brokers)


def _silent_logger():
    import logging

    logger = logging.getLogger("oncely.local_kafka.librdkafka")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger
