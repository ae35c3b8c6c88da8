"""A processor's identity, kept in its state dir: one process per dir, and
the ids that let a restart take its place at once.

- `transactional.id`: the restart's `init_transactions` fences its own
  zombie and settles its open transaction immediately;
- `group.instance.id` (static membership, KIP-345): the restart rejoins as
  the same group member and gets its partitions back without waiting for
  the dead member's session to time out, and without a rebalance.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from oncely.errors import ConfigError


class StateDirLock:
    """One process per state dir: two would share a transactional.id and
    fence each other forever."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = Path(self.path).read_text().strip() or "?"
            os.close(self._fd)
            raise ConfigError(
                f"state dir {root} is in use by another oncely process (pid {other}); give each process "
                "its own --state-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, str(os.getpid()).encode())

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _persisted_id(root: Path, file: str, prefix: str) -> str:
    path = root / file
    if path.exists():
        return path.read_text().strip()
    value = f"{prefix}-{uuid.uuid4().hex[:16]}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.rename(path)
    return value


def transactional_id(root: Path, app: str) -> str:
    """Stable per state dir, so a restart fences its own zombie at once."""
    return _persisted_id(root, "transactional-id", f"oncely-{app}")


def group_instance_id(root: Path, app: str) -> str:
    """Stable per state dir, so a restart is the same static group member."""
    return _persisted_id(root, "group-instance-id", f"oncely-{app}")
