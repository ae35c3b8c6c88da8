"""Read an app's state and invocations back from its changelog.

The changelog (read_committed) is the source of truth; this is what
`oncely inspect` prints and what tests and the demo verify against. It reads
the whole changelog, so it is a tool for inspection, not a query path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from oncely import schemas
from oncely.context import decode_value
from oncely.processor import keys
from oncely.shuffle.ids import format_id
from oncely.kafka_io import read_to_end

if TYPE_CHECKING:
    from oncely.app import App


def changelog_latest(bootstrap: str, app: str, timeout: float = 120.0,
                     config: dict[str, Any] | None = None) -> dict[bytes, bytes]:
    """Latest committed value per changelog key (tombstoned keys removed);
    `config`: extra librdkafka settings (SASL, SSL, ...)."""
    latest: dict[bytes, bytes | None] = {}
    for r in read_to_end(bootstrap, f"{app}.changelog", timeout=timeout, config=config):
        latest[r.key] = r.value  # type: ignore[index]
    return {k: v for k, v in latest.items() if v is not None}


def parse_state_key(k: bytes) -> tuple[str, bytes, str]:
    """(service, key, name) of a state store key."""
    n = keys.service_key_length(k, 1)
    service, key = keys.split_service_key(k[1:1 + n])
    return service, key, k[1 + n:].decode()


def state_of(kv: dict[bytes, bytes]) -> dict[tuple[str, bytes, str], Any]:
    return {parse_state_key(k): decode_value(v) for k, v in kv.items() if k[:1] == keys.STATE}


def read_state(bootstrap: str, app: str) -> dict[tuple[str, bytes, str], Any]:
    """Every (service, key, name) -> value the app's committed state holds."""
    return state_of(changelog_latest(bootstrap, app))


@dataclass
class InvocationInfo:
    id: str
    target: str
    key: bytes | None
    phase: str
    attempt: int
    error: str | None


def invocations_of(kv: dict[bytes, bytes]) -> list[InvocationInfo]:
    """Invocations that outlived a commit: in flight (inboxed, running,
    backing off, paused) and retained failures."""
    out = []
    for k, v in kv.items():
        if k[:1] not in (keys.STATUS, keys.FAILED):
            continue
        st = schemas.decode("invocation_status", v)
        inv = st["invoke"]
        out.append(InvocationInfo(format_id(inv["invocation_id"]), f"{inv['service']}/{inv['handler']}",
                                  inv["key"], st["phase"], st["attempt"], st["error"]))
    return sorted(out, key=lambda i: (i.phase, i.target, i.id))


def read_invocations(bootstrap: str, app: str) -> list[InvocationInfo]:
    return invocations_of(changelog_latest(bootstrap, app))


def restore_partitions(app: "App", partitions: list[int], wipe: bool = True) -> int:
    """Rebuild partitions' local stores from the changelog, with no processor
    running on this state dir (its lock is taken). Returns records applied."""
    from pathlib import Path

    from oncely.processor.identity import StateDirLock
    from oncely.processor.restore import Restorer
    from oncely.processor.store import PartitionStore

    cfg = app.config
    root = Path(cfg.state_dir) / app.name
    lock = StateDirLock(root)
    stores: dict[int, PartitionStore] = {}
    restorer = Restorer({"bootstrap.servers": cfg.bootstrap, **cfg.kafka}, app.changelog_topic, 24 * 3600 * 1000)
    try:
        for p in partitions:
            if not 0 <= p < app.partitions:
                raise ValueError(f"partition {p} is not one of {app.name}'s 0..{app.partitions - 1}")
            store = PartitionStore(root / str(p), app.name, app.partitions, p)
            store.open()
            if wipe:
                store.wipe()
            stores[p] = store
        return restorer.restore(stores)
    finally:
        for store in stores.values():
            store.close()
        restorer.close()
        lock.release()
