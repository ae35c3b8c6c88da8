"""Key -> log partition, the same function as Kafka's default partitioner.

Using Kafka's murmur2 means a producer outside oncely (Java, librdkafka with
`partitioner=murmur2_random`) that keys records the same way lands them on
the same partition, and `cart/alice` and `user/alice` share a partition.
"""

from __future__ import annotations

import functools

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2`, as an unsigned 32-bit value."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    n4 = length & ~3
    for i in range(0, n4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[n4 + 2] << 16
    if rest >= 2:
        h ^= data[n4 + 1] << 8
    if rest >= 1:
        h ^= data[n4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def _partition(routing_key: bytes, partitions: int) -> int:
    return (murmur2(routing_key) & 0x7FFFFFFF) % partitions


_cached = functools.lru_cache(maxsize=1 << 14)(_partition)


def partition_for(routing_key: bytes, partitions: int) -> int:
    """Kafka's default partition for a non-null key: toPositive(murmur2) % n.
    Short keys are cached: they repeat (every record of a customer, every
    send to a key), and murmur2 in Python costs microseconds per key."""
    if len(routing_key) > 64:
        return _partition(routing_key, partitions)
    return _cached(routing_key, partitions)
