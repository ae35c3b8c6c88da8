"""Records read by the poll loop, to where they belong.

A log record goes to its partition processor by kind (Invoke, Response,
AwakeableResult; Attach, ReadState and Delay from outside: requests.py;
Control and Query from operators: controls.py; Mark: local_start.py); one that does not decode (also one
of a kind this version does not know) becomes a dead letter with the reason, so nothing is lost and
nothing stalls. A source record becomes an Invoke that starts on this
process at once (local_start.py), else an Invoke on the log, or a dead
letter (ingest/router.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.egress.dead_letters import dead_letter
from oncely.ingest.router import Routed, route
from oncely.processor import controls, requests
from oncely.processor.invocation import TxnOutput
from oncely.processor.local_start import LocalStarts
from oncely.processor.partition import PartitionProcessor
from oncely.shuffle.envelope import encode_invoke

if TYPE_CHECKING:
    from oncely.app import App

log = logging.getLogger("oncely.commit")


def log_record(app: "App", part: PartitionProcessor, m: Any, out: TxnOutput,
               local: LocalStarts | None = None) -> None:
    if not part.ahead.admit(m.offset()):
        return  # applied before the re-read (inbox.py, ReadAhead)
    try:
        kind, body = schemas.decode("log_record", m.value())["body"]
    except schemas.SchemaError as e:
        _dead(app, out, m, "undecodable-log-record", str(e))
        return
    if kind == "oncely.Invoke":
        ended = local.read_back(part, body) if local is not None else None
        part.on_invoke(body, m.offset())
        if ended is not None:
            local.release(part, ended)  # type: ignore[union-attr]
    elif kind == "oncely.Response":
        part.on_response(body)
    elif kind == "oncely.AwakeableResult":
        part.on_awakeable_result(body)
    elif kind == "oncely.Attach":
        requests.on_attach(part, body)
    elif kind == "oncely.ReadState":
        requests.on_read_state(part, body)
    elif kind == "oncely.Control":
        controls.on_control(part, body)
    elif kind == "oncely.Query":
        controls.on_query(part, body)
    elif kind == "oncely.Delay":
        requests.on_delay(part, body)
    elif local is not None:  # the decoder knows no other kind than oncely.Mark
        local.on_mark(part, body)


def _dead(app: "App", out: TxnOutput, m: Any, reason: str, error: str) -> None:
    _count_dead(out, reason)
    k, v, h = dead_letter(app.name, reason, error, m.key(), m.value(),
                          source={"topic": m.topic(), "partition": m.partition(), "offset": m.offset()})
    out.produce(app.dlq_topic, k, v, h)


def source_record(app: "App", sub: Any, m: Any, out: TxnOutput, local: LocalStarts | None = None) -> None:
    """A source record becomes an invocation started here, or an Invoke on
    the log (or a dead letter), in the open transaction, which also carries
    the source offset."""
    sub.stats["read"] += 1
    routed = route(app.name, app.partitions, sub, m)
    if isinstance(routed, Routed):
        sub.stats["invoked"] += 1
        if local is not None:
            if local.start(routed, out):
                sub.stats["local"] += 1
                return
            out.produce(app.log_topic, routed.key, encode_invoke(routed.invoke), partition=routed.partition)
            local.sent(routed)
        else:
            out.produce(app.log_topic, routed.key, encode_invoke(routed.invoke), partition=routed.partition)
    else:
        out.produce(app.dlq_topic, routed.key, routed.value, routed.headers)
        sub.stats["dead"] += 1
        _count_dead(out, routed.reason)
        log.warning("%s: %s[%d]@%d dead-lettered (%s)", sub.name, m.topic(), m.partition(), m.offset(),
                    routed.reason)


def _count_dead(out: TxnOutput, reason: str) -> None:
    metrics = getattr(out, "metrics", None)  # the commit loop's, with --metrics
    if metrics is not None:
        metrics.dead_letter(reason)
