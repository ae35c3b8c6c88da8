"""The jars of the pinned Apache Kafka release, resolved with Maven, and the
JDK that runs them (oncely/local_kafka.py starts the broker)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# The one place the broker version is pinned. 4.3.1 is the newest Apache Kafka
# 4.x whose artifacts are all on Maven Central: 4.4.0's kafka_2.13 pom depends
# on kafka-tools-api 4.4.0, which Maven Central does not carry (checked
# 2026-11-21), so 4.4.0 cannot be resolved.
KAFKA_VERSION = "4.3.1"
LOG4J_VERSION = "2.24.3"
MIN_JAVA = 17

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.oncely</groupId>
  <artifactId>local-kafka</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""



class LocalKafkaError(RuntimeError):
    """The local broker could not be set up or started; the message says why
    and what to do."""


def check_java() -> str:
    """Return the java executable, or explain how to get a JDK >= 17."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise LocalKafkaError(
            f"Java is missing: Apache Kafka {KAFKA_VERSION} needs a JDK {MIN_JAVA} or newer on PATH "
            "(or JAVA_HOME). Install one, e.g. `apt-get install openjdk-17-jre-headless` "
            "or Temurin from https://adoptium.net, then retry."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if m:
        major = int(m.group(1))
        if major == 1 and m.group(2):
            major = int(m.group(2))
        if major < MIN_JAVA:
            raise LocalKafkaError(
                f"Java {major} found at {java}, but Apache Kafka {KAFKA_VERSION} needs Java {MIN_JAVA} "
                "or newer: install a newer JDK and put it first on PATH (or set JAVA_HOME)."
            )
    return java


def resolve_jars(libs_dir: Path) -> Path:
    """Resolve the pinned release's jars with Maven into `libs_dir`, once."""
    if (libs_dir / ".complete").exists():
        return libs_dir
    mvn = shutil.which("mvn")
    if not mvn:
        raise LocalKafkaError(
            f"Maven is missing: it downloads Apache Kafka {KAFKA_VERSION} from Maven Central on the "
            "first start. Install it (e.g. `apt-get install maven`, or https://maven.apache.org) and retry; "
            f"later starts reuse the jars in {libs_dir}."
        )
    check_java()
    work = libs_dir.parent
    work.mkdir(parents=True, exist_ok=True)
    pom = work / "pom.xml"
    pom.write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    staging = work / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    proc = subprocess.run(
        [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        out = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise LocalKafkaError(
            f"Downloading Apache Kafka {KAFKA_VERSION} from Maven Central failed (mvn exit {proc.returncode}). "
            f"Check network access to repo.maven.apache.org (or Maven's settings.xml mirror).\n{out}"
        )
    shutil.rmtree(libs_dir, ignore_errors=True)
    staging.rename(libs_dir)
    (libs_dir / ".complete").write_text(KAFKA_VERSION)
    return libs_dir
