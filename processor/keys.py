"""Store key spaces of a partition's RocksDB (and changelog keys).

Each key starts with a one-byte space tag. Variable-length parts are length
prefixed so that a prefix of whole parts is a valid range-scan prefix; numbers
that must sort (sequence, fire time, index) are fixed-width big-endian.
"""

from __future__ import annotations

import functools
import struct

META = b"\x00"       # local only, never in the changelog: checkpoint, format
STATE = b"s"         # s | service | key | name           -> tagged value
STATUS = b"v"        # v | invocation id                  -> InvocationStatus (in flight)
JOURNAL = b"j"       # j | invocation id | index u32      -> JournalEntry
INBOX = b"q"         # q | service | key | seq u64        -> InvocationStatus (INBOXED: waits for its key)
READY = b"r"         # r | seq u64                        -> InvocationStatus (INBOXED: waits for capacity)
QUEUED = b"w"        # w | invocation id                  -> b"" (a queued Invoke with an idempotency key)
LOCK = b"l"          # l | service | key                  -> invocation id
TIMER = b"t"         # t | fire ms u64 | invocation id | index u32 -> timer payload
DEDUP = b"d"         # d | invocation id                  -> DedupEntry
FAILED = b"f"        # f | invocation id                  -> InvocationStatus (retained failure)
EXPIRY = b"x"        # x | expiry ms u64 | space tag | invocation id -> b""
EARLY = b"c"         # c | invocation id | index u32      -> JournalEntry (a completion that came first)
WAITER = b"a"        # a | invocation id                  -> (request id, replies partition u32)*: attached callers
AHEAD = b"u"         # u                                  -> skip-until u64, (skip-until - offset) u32*: read-ahead
DOOMED = b"n"        # n | invocation id                  -> b"cancel" | b"kill": an INBOXED one fails at its start

# The spaces that say an invocation id was accepted, one lookup each: in
# flight (suspended ones live only here), queued, finished (result kept), failed.
ACCEPTED = (STATUS, QUEUED, DEDUP, FAILED)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _lp(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


@functools.lru_cache(maxsize=4096)
def service_key(service: str, key: bytes) -> bytes:
    """The (service, key) part shared by state, inbox and lock keys.
    Cached: a key's records come again and again (every record of a
    customer), and the cache's lookup costs half of making it."""
    return _lp(service.encode()) + _U32.pack(len(key)) + key


def state(sk: bytes, name: str) -> bytes:
    return STATE + sk + name.encode()


def state_prefix(sk: bytes) -> bytes:
    return STATE + sk


def status(inv_id: bytes) -> bytes:
    return STATUS + inv_id


def journal(inv_id: bytes, index: int) -> bytes:
    return JOURNAL + inv_id + _U32.pack(index)


def journal_prefix(inv_id: bytes) -> bytes:
    return JOURNAL + inv_id


def journal_index(key: bytes) -> int:
    return _U32.unpack_from(key, len(key) - 4)[0]


def inbox(sk: bytes, seq: int) -> bytes:
    return INBOX + sk + _U64.pack(seq)


def inbox_prefix(sk: bytes) -> bytes:
    return INBOX + sk


def ready(seq: int) -> bytes:
    return READY + _U64.pack(seq)


def queued(inv_id: bytes) -> bytes:
    return QUEUED + inv_id


def seq_of(key: bytes) -> int:
    """The sequence number ending an INBOX or READY key."""
    return _U64.unpack_from(key, len(key) - 8)[0]


def lock(sk: bytes) -> bytes:
    return LOCK + sk


def split_service_key(sk: bytes) -> tuple[str, bytes]:
    n = _U32.unpack_from(sk, 0)[0]
    service = sk[4:4 + n].decode()
    m = _U32.unpack_from(sk, 4 + n)[0]
    return service, sk[8 + n:8 + n + m]


def service_key_length(buf: bytes, start: int) -> int:
    """Length of the (service, key) part that begins at `start` in `buf`."""
    n = _U32.unpack_from(buf, start)[0]
    m = _U32.unpack_from(buf, start + 4 + n)[0]
    return 8 + n + m


def doomed(inv_id: bytes) -> bytes:
    return DOOMED + inv_id


def timer(fire_ms: int, inv_id: bytes, index: int) -> bytes:
    return TIMER + _U64.pack(fire_ms) + inv_id + _U32.pack(index)


def parse_timer(key: bytes) -> tuple[int, bytes, int]:
    return _U64.unpack_from(key, 1)[0], key[9:25], _U32.unpack_from(key, 25)[0]


def early(inv_id: bytes, index: int) -> bytes:
    return EARLY + inv_id + _U32.pack(index)


def early_prefix(inv_id: bytes) -> bytes:
    return EARLY + inv_id


def waiters(inv_id: bytes) -> bytes:
    return WAITER + inv_id


def dedup(inv_id: bytes) -> bytes:
    return DEDUP + inv_id


def failed(inv_id: bytes) -> bytes:
    return FAILED + inv_id


def expiry(expires_ms: int, space: bytes, inv_id: bytes) -> bytes:
    return EXPIRY + _U64.pack(max(0, expires_ms)) + space + inv_id


def expiry_upper(now_ms: int) -> bytes:
    """Exclusive upper bound of expiry keys due at `now_ms`."""
    return EXPIRY + _U64.pack(now_ms + 1)


def parse_expiry(key: bytes) -> tuple[int, bytes, bytes]:
    return _U64.unpack_from(key, 1)[0], key[9:10], key[10:]


def prefix_end(prefix: bytes) -> bytes | None:
    """Smallest key greater than every key starting with `prefix`."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return None
