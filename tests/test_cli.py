"""The command line against the broker: every mistake of a newcomer is one
sentence (table-driven: exit status and the message's first line), nothing
is created before the checks pass, and the daily commands work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from oncely.testing import create_topic, produce, read_to_end, unique_name
from support import REPO, oncely_cli, wait_until

UNREACHABLE = "Error: cannot reach Kafka at 127.0.0.1:1: is a broker running? (`oncely kafka start`)"
MISSING_BOOTSTRAP = "Error: Missing option '--bootstrap'."
APP = f"cli-{uuid.uuid4().hex[:8]}"  # never started: its topics must never appear
SOURCE = f"cli-source-{uuid.uuid4().hex[:8]}"  # 3 records, created by the `source` fixture

# (id, arguments, environment, exit status, first line of the message). In
# arguments and values, {kafka} is the broker, {app} a fresh app name and
# {source} a topic holding 3 records.
BAD_INPUTS = [
    ("unreachable", ["run", "tests.apps.counter:app", "--bootstrap", "127.0.0.1:1"], {}, 1, UNREACHABLE),
    ("unreachable-inspect", ["inspect", "state", "{app}", "--bootstrap", "127.0.0.1:1"], {}, 1, UNREACHABLE),
    ("log-level", ["run", "tests.apps.counter:app", "--log-level", "LOUD"], {}, 2,
     "Error: Invalid value for '--log-level': 'LOUD' is not one of"),
    ("log-level-everywhere", ["topics", "list", "--log-level", "LOUD"], {}, 2,
     "Error: Invalid value for '--log-level': 'LOUD' is not one of"),
    ("inspect-no-bootstrap", ["inspect", "state", "{app}"], {}, 2, MISSING_BOOTSTRAP),
    ("awakeable-no-bootstrap", ["awakeable", "resolve", "awk_x"], {}, 2, MISSING_BOOTSTRAP),
    ("inspect-missing-app", ["inspect", "invocations", "{app}", "--bootstrap", "{kafka}"], {}, 1,
     "Error: app '{app}' has no topic {app}.changelog at {kafka}: check the name"),
    ("awakeable-malformed", ["awakeable", "resolve", "awk_abc", "--bootstrap", "{kafka}"], {}, 1,
     "Error: awakeable id 'awk_abc' is malformed"),
    ("awakeable-not-json", ["awakeable", "resolve", "awk_abc", "yes", "--bootstrap", "{kafka}"], {}, 2,
     "Error: VALUE must be JSON"),
    ("unknown-kafka-setting-env", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_KAFKA_FOO_BAR": "1"}, 1,
     "Error: Kafka setting foo.bar='1' (from ONCELY_KAFKA_FOO_BAR) is refused: No such configuration property"),
    ("unknown-kafka-setting-app", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_TEST_SETTINGS": '{"kafka": {"foo.bar": "1"}}'}, 1,
     "Error: Kafka setting foo.bar='1' (from App(kafka=...)) is refused: No such configuration property"),
    ("unknown-kafka-setting-cli", ["inspect", "state", "{app}", "--bootstrap", "{kafka}", "--kafka", "foo.bar=1"],
     {}, 1, "Error: Kafka setting foo.bar='1' (from --kafka) is refused"),
    ("bad-kafka-value", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_KAFKA_SOCKET_TIMEOUT_MS": "soon"}, 1,
     "Error: Kafka setting socket.timeout.ms='soon' (from ONCELY_KAFKA_SOCKET_TIMEOUT_MS) is refused"),
    ("malformed-kafka-option", ["inspect", "state", "{app}", "--bootstrap", "{kafka}", "--kafka", "nonsense"], {}, 2,
     "Error: Invalid value for '--kafka': 'nonsense' is not KEY=VALUE"),
    ("reserved-kafka-setting", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_KAFKA_GROUP_ID": "mine"}, 1,
     "Error: Kafka setting group.id (from ONCELY_KAFKA_GROUP_ID) is set by oncely itself: remove it"),
    ("linger-beyond-timeout", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_KAFKA_LINGER_MS": "20000"}, 1,
     "Error: Kafka setting linger.ms='20000' (from ONCELY_KAFKA_LINGER_MS) must be below "
     "transaction_timeout_ms=10000, the producer's message.timeout.ms"),
    ("bad-offset-reset", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_KAFKA_AUTO_OFFSET_RESET": "error"}, 1,
     "Error: auto.offset.reset='error' (from ONCELY_KAFKA_AUTO_OFFSET_RESET): use 'earliest' or 'latest'"),
    ("missing-source-topic", ["run", "tests.apps.orders:app", "--bootstrap", "{kafka}"],
     {"ONCELY_TEST_SOURCE": "{app}-orders"}, 1,
     "Error: source topic(s) ['{app}-orders'] of app '{app}' do not exist: create them (`oncely topics create`"),
    ("unknown-app-setting", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_TEST_SETTINGS": '{"colour": "blue"}'}, 1,
     "Error: App('{app}') got an unknown setting 'colour'; the settings are: bootstrap, commit_drain_share"),
    ("wrong-app-setting-type", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_TEST_SETTINGS": '{"create_sink_topics": "yes"}'}, 1,
     "Error: App('{app}') setting create_sink_topics='yes' must be a bool"),
    ("bad-env-setting", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"], {"ONCELY_MAX_BATCH": "ten"}, 1,
     "Error: ONCELY_MAX_BATCH='ten' is not a valid int"),
    ("commit-interval", ["run", "tests.apps.counter:app", "--bootstrap", "{kafka}"],
     {"ONCELY_COMMIT_INTERVAL": "20"}, 1,
     "Error: commit_interval=20.0 s must be well below transaction_timeout_ms=10000"),
    ("no-module", ["run", "no_such_module:app", "--bootstrap", "{kafka}"], {}, 1,
     "Error: cannot import 'no_such_module' (from 'no_such_module:app')"),
    ("replay-past-end", ["replay", "tests.apps.orders:app", "--bootstrap", "{kafka}", "--topic", "{source}",
                         "--from-offset", "5000"], {"ONCELY_TEST_SOURCE": "{source}"}, 1,
     "Error: nothing to replay: {source} holds no record in [5000, end) (offsets held: [0] 0..2)"),
    ("replay-inverted", ["replay", "tests.apps.orders:app", "--bootstrap", "{kafka}", "--topic", "{source}",
                         "--from-offset", "2", "--to-offset", "1"], {"ONCELY_TEST_SOURCE": "{source}"}, 1,
     "Error: the range [2, 1) is empty: its start must come before its end"),
    ("replay-negative", ["replay", "tests.apps.orders:app", "--topic", "{source}", "--from-offset", "-1"], {}, 2,
     "Error: Invalid value for '--from-offset': -1 is not in the range x>=0."),
    ("produce-missing-topic", ["produce", "{app}-nothing", "--value", "x", "--bootstrap", "{kafka}"], {}, 1,
     "Error: topic {app}-nothing does not exist: create it with `oncely topics create {app}-nothing`"),
    ("produce-bad-json-line", ["produce", "{source}", "--bootstrap", "{kafka}"], {"STDIN": "{oops\n"}, 1,
     "Error: stdin line 1 is not JSON"),
    ("tail-nothing-named", ["tail", "--bootstrap", "{kafka}"], {}, 2, "Error: name a TOPIC, or --dlq APP"),
    ("tail-missing-dlq", ["tail", "--dlq", "{app}", "--bootstrap", "{kafka}"], {}, 1,
     "Error: app '{app}' has no topic {app}.dlq at {kafka}: check the name"),
    ("retry-nothing-named", ["invocations", "retry", "{app}", "--bootstrap", "{kafka}"], {}, 2,
     "Error: name the failed invocations"),
    ("invocations-missing-app", ["invocations", "kill", "{app}", "inv_x", "--bootstrap", "{kafka}"], {}, 1,
     "Error: app '{app}' has no topic {app}.log at {kafka}"),
    ("invocations-bad-phase", ["invocations", "list", "{app}", "--phase", "DONE", "--bootstrap", "{kafka}"], {}, 2,
     "Error: Invalid value for '--phase': 'DONE' is not one of"),
    ("admin-off-loopback", ["run", "tests.apps.counter:app", "--admin", "0.0.0.0:9070"],
     {"ONCELY_ADMIN_TOKEN": ""}, 1, "Error: --admin 0.0.0.0:9070: the admin API can kill and purge invocations, "
     "so on a non-loopback address it needs a bearer token (set ONCELY_ADMIN_TOKEN or --admin-token)"),
    ("gateway-nothing-to-serve", ["gateway", "--app", "tests.apps.counter:app"], {}, 1,
     "Error: nothing to serve: give --http HOST:PORT, --admin HOST:PORT, or both"),
    ("restore-nothing-named", ["restore", "tests.apps.counter:app", "--bootstrap", "{kafka}"], {}, 2,
     "Error: name the partitions to rebuild with --partition N, or pass --all"),
]


@pytest.fixture(scope="module")
def source(kafka: str) -> str:
    create_topic(kafka, SOURCE, 1)
    produce(kafka, SOURCE, [{"id": i, "customer": "c", "amount": 1} for i in range(3)])
    return SOURCE


@pytest.mark.parametrize("args,env,status,first_line", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_a_bad_input_is_one_sentence(kafka: str, source: str, args: list[str], env: dict[str, str], status: int,
                                     first_line: str) -> None:
    def fill(text: str) -> str:
        return text.replace("{kafka}", kafka).replace("{app}", APP).replace("{source}", source)

    env = {"ONCELY_TEST_APP": APP, **{k: fill(v) for k, v in env.items()}}
    stdin = env.pop("STDIN", "")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "oncely", *map(fill, args)], cwd=REPO, env={**clean, **env},
                         input=stdin, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert out.returncode == status, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(fill(first_line)), out.stderr
    assert "Traceback" not in out.stderr
    if status == 1:
        assert out.stderr.splitlines()[0] == errors[0], "something was printed before the message"
    assert elapsed < 15, f"took {elapsed:.1f} s"
    from confluent_kafka.admin import AdminClient

    assert not [t for t in AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=10).topics
                if t.startswith(f"{APP}.")], "a topic of the app was created before the checks"


def test_version_and_python_m() -> None:
    for cmd in ([sys.executable, "-m", "oncely", "--version"], [sys.executable, "-m", "oncely.cli", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "oncely, version 0.1.0", out


def test_topics_produce_and_tail(kafka: str) -> None:
    env = {"ONCELY_KAFKA_BOOTSTRAP": kafka}
    topic = unique_name("cli-topic")

    def ok(*args: str, stdin: str | None = None) -> str:
        out = oncely_cli(*args, env=env, stdin=stdin)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert ok("topics", "create", topic, "--partitions", "2", "--config", "retention.ms=3600000").strip() == \
        f"created topic {topic} (2 partitions)"
    assert ok("topics", "create", topic).strip() == f"topic {topic} exists already (2 partitions)"
    assert f"{topic} 2" in ok("topics", "list").splitlines()
    assert "__consumer_offsets" not in ok("topics", "list")
    assert ok("tail", topic).strip() == f"no records in {topic} (the last 10 of each partition)"
    lines = "\n".join(['{"key": "a", "value": {"n": 1}, "headers": {"Idempotency-Key": "k1"}}',
                       '{"key": "a", "value": "plain text"}', "", '{"value": [3]}']) + "\n"
    assert ok("produce", topic, stdin=lines).strip() == f"produced 3 records to {topic}"
    assert ok("produce", topic, "--key", "b", "--value", "one more", "--header", "h=v", "--partition", "1").strip() \
        == f"produced 1 record to {topic}"
    got = read_to_end(kafka, topic)
    assert sorted((r.key or b"", r.value) for r in got) == [(b"", b"[3]"), (b"a", b"plain text"), (b"a", b'{"n":1}'),
                                                             (b"b", b"one more")]
    shown = ok("tail", topic, "--from-beginning")
    assert "key=a" in shown and '  {"n":1}' in shown and "  Idempotency-Key: k1" in shown and "  h: v" in shown
    used = {r.partition for r in got}
    assert ok("tail", topic, "-n", "1").count(f"{topic}[") == len(used)  # the last record of each partition
    described = ok("topics", "describe", topic)
    assert described.startswith(f"{topic}: 2 partitions") and "retention.ms=3600000" in described
    assert sum(int(n) for n in re.findall(r"\((\d+) records\)", described)) == 4


def test_tail_follows_until_stopped(kafka: str, tmp_path: Path) -> None:
    topic = create_topic(kafka, unique_name("cli-follow"), 1)
    out = tmp_path / "tail.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "oncely", "tail", topic, "--follow", "--bootstrap", kafka],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        for i in range(3):
            produce(kafka, topic, [("k", f"late-{i}")])
            wait_until(lambda: f"late-{i}" in out.read_text(), 30, 0.2, f"record {i} while following")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
