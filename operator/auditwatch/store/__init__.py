"""Durable storage of audit events: write-ahead staging, Parquet partitions, queries.

`Store` is what the receiver writes through (2xx only after `append` returned); `query` reads
a data directory, from a running receiver's or a copy.
"""

from auditwatch.store.errors import StorageUnavailable, StoreLocked
from auditwatch.store.query import parse_time_bound, query
from auditwatch.store.store import Store, StreamStats

__all__ = [
    "StorageUnavailable",
    "Store",
    "StoreLocked",
    "StreamStats",
    "parse_time_bound",
    "query",
]
