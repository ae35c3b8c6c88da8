"""The Kafka Streams peer: resolve its jars, compile it, and give its command line.

bench/java/PeerStreams.java is the peer workload in Kafka Streams (the same
Apache Kafka release as the broker, oncely.kafka_jars.KAFKA_VERSION). Maven
resolves kafka-streams, Jackson and slf4j-simple once into
<oncely cache>/bench-streams-<version>/libs, as oncely/kafka_jars.py does for
the broker; javac compiles the source once into classes-<hash> next to it,
the hash being of the source and the pom, so an edited source is recompiled
and an unchanged one is not. bench_peers.py calls `prepare()` before it
measures anything (so neither Maven nor javac counts as start-up) and
`command()` for each run. Standalone, it runs the peer until SIGTERM:

    python bench/peer_streams.py --bootstrap HOST:PORT --source T --out T --group G --state-dir D
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from oncely.kafka_jars import KAFKA_VERSION, check_java
from oncely.local_kafka import default_cache_dir

SOURCE = Path(__file__).resolve().parent / "java" / "PeerStreams.java"
MAIN_CLASS = "PeerStreams"
JACKSON_VERSION = "2.21.2"  # the broker's own, so usually already in ~/.m2
SLF4J_VERSION = "1.7.36"  # the slf4j-api kafka-clients brings; the binding must match it

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.oncely</groupId>
  <artifactId>bench-streams</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-streams</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>com.fasterxml.jackson.core</groupId><artifactId>jackson-databind</artifactId><version>{jackson}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>{slf4j}</version></dependency>
  </dependencies>
</project>
"""

# slf4j-simple at WARN: the peers log warnings and errors only.
JVM_FLAGS = ["-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-Dorg.slf4j.simpleLogger.showDateTime=true"]


class StreamsPeerError(RuntimeError):
    """Maven or javac failed; the message carries the tail of their output."""


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise StreamsPeerError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _libs(home: Path, pom_text: str) -> Path:
    """kafka-streams and the rest in home/libs, downloaded once."""
    libs = home / "libs"
    if (libs / ".complete").exists() and (libs / ".complete").read_text() == pom_text:
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise StreamsPeerError("Maven (mvn) is missing: it fetches kafka-streams from Maven Central once")
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_text(pom_text)
    staging = home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    print(f"resolving kafka-streams {KAFKA_VERSION} into {libs} (once)", flush=True)
    _run([mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
          "-DincludeScope=runtime"], "mvn dependency:copy-dependencies")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    (libs / ".complete").write_text(pom_text)
    return libs


def _classes(home: Path, libs: Path, key: str) -> Path:
    """The compiled source in home/classes-<key>, compiled once per key."""
    classes = home / f"classes-{key}"
    if (classes / f"{MAIN_CLASS}.class").exists():
        return classes
    javac = shutil.which("javac", path=str(Path(check_java()).parent)) or shutil.which("javac")
    if not javac:
        raise StreamsPeerError("javac is missing: the Kafka Streams peer needs a JDK (17 or newer), not a JRE")
    staging = home / f"classes-{key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    _run([javac, "--release", "17", "-cp", f"{libs}/*", "-d", str(staging), str(SOURCE)], "javac PeerStreams.java")
    staging.rename(classes)
    return classes


def prepare(cache: Path | None = None) -> list[str]:
    """Resolve, compile if the source changed; the JVM's argv up to the main
    class's arguments (java, flags, -cp, main class)."""
    home = (cache or default_cache_dir()) / f"bench-streams-{KAFKA_VERSION}"
    pom_text = _POM.format(kafka=KAFKA_VERSION, jackson=JACKSON_VERSION, slf4j=SLF4J_VERSION)
    key = hashlib.sha256(SOURCE.read_bytes() + pom_text.encode()).hexdigest()[:12]
    libs = _libs(home, pom_text)
    classes = _classes(home, libs, key)
    return [check_java(), *JVM_FLAGS, "-cp", f"{classes}{os.pathsep}{libs}/*", MAIN_CLASS]


def command(jvm: list[str], bootstrap: str, source: str, out: str, group: str, state_dir: Path | str,
            commit_interval: float = 0.1) -> list[str]:
    """The peer's argv: `jvm` from prepare() plus the run's arguments."""
    return [*jvm, "--bootstrap", bootstrap, "--source", source, "--out", out, "--group", group,
            "--state-dir", str(state_dir), "--commit-interval", str(commit_interval)]


def main() -> None:
    from peer_args import peer_args

    args = peer_args(__doc__, state_dir=True)
    argv = command(prepare(), args.bootstrap, args.source, args.out, args.group, args.state_dir,
                   args.commit_interval)
    os.execv(argv[0], argv)  # the JVM takes this process's place, and its SIGTERM


if __name__ == "__main__":
    main()
