"""Deleting whole partitions once they are entirely older than a stream's retention."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from auditwatch.store.fsutil import fsync_dir
from auditwatch.store.layout import (
    PARQUET_SUFFIX,
    Partition,
    date_partitions,
    hour_partitions,
    minute_partitions,
)
from auditwatch.store.parquet import file_summary


@dataclass(frozen=True)
class Deleted:
    """A partition removed by retention, with the rows and bytes it held."""

    path: Path
    rows: int
    bytes: int


def expired_partitions(stream_dir: Path, cutoff: datetime) -> list[Partition]:
    """The largest partitions (date, else hour, else minute) that end at or before `cutoff`."""
    expired: list[Partition] = []
    for date in date_partitions(stream_dir):
        if date.end <= cutoff:
            expired.append(date)
        elif date.start < cutoff:
            for hour in hour_partitions(date):
                if hour.end <= cutoff:
                    expired.append(hour)
                elif hour.start < cutoff:
                    expired.extend(m for m in minute_partitions(hour) if m.end <= cutoff)
    return expired


def delete_partition(partition: Partition) -> Deleted:
    """Remove a partition directory; its rows and bytes are read from the footers first."""
    rows = size = 0
    for file in partition.path.rglob("*" + PARQUET_SUFFIX):
        if not file.name.startswith("."):
            file_rows, file_bytes, _, _ = file_summary(file)
            rows += file_rows
            size += file_bytes
    shutil.rmtree(partition.path)
    fsync_dir(partition.path.parent)
    return Deleted(partition.path, rows, size)
