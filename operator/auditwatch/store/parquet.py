"""Turning a staging segment into Parquet files, one per minute partition, idempotently."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from auditwatch.schema import EVENT_JSON, EVENT_SCHEMA, INGEST_TIME
from auditwatch.store.fsutil import fsync_dir, make_dirs
from auditwatch.store.layout import PARQUET_SUFFIX, TEMP_SUFFIX, partition_dir

COMPRESSION = "zstd"

_STATISTICS_COLUMNS = [name for name in EVENT_SCHEMA.names if name != EVENT_JSON]
"""Min/max statistics for every column but the whole event's JSON text, which no query
filters on by range: computing them was a quarter of the time spent writing Parquet."""


def write_partitioned(stream_dir: Path, stem: str, table: pa.Table) -> list[Path]:
    """Write `table` as `<partition>/<stem>.parquet` per UTC minute of p_timestamp.

    Each file is written under a hidden temporary name, fsync'ed, renamed into place and its
    directory fsync'ed: readers never see half a file, and writing the same segment again
    replaces its files rather than adding copies.
    """
    minutes = pc.floor_temporal(table[INGEST_TIME], unit="minute")
    distinct = pc.unique(minutes)
    written = []
    for minute in distinct.to_pylist():
        if len(distinct) == 1:
            part = table  # the usual case: filtering would only copy every event's text
        else:
            part = table.filter(pc.equal(minutes, pa.scalar(minute, minutes.type)))
        directory = partition_dir(stream_dir, minute.astimezone(UTC))
        make_dirs(directory)
        final = directory / (stem + PARQUET_SUFFIX)
        temp = directory / f".{stem}{PARQUET_SUFFIX}{TEMP_SUFFIX}"
        with open(temp, "wb") as file:
            pq.write_table(
                part, file, compression=COMPRESSION, write_statistics=_STATISTICS_COLUMNS
            )
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
        fsync_dir(directory)
        written.append(final)
    return written


def file_summary(path: Path) -> tuple[int, int, datetime | None, datetime | None]:
    """Rows, bytes, newest eventTime and newest p_timestamp of a Parquet file, from its footer."""
    metadata = pq.read_metadata(path)
    newest: dict[str, datetime | None] = {"eventTime": None, INGEST_TIME: None}
    names = metadata.schema.names
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for column in newest:
            if column not in names:
                continue
            stats = row_group.column(names.index(column)).statistics
            if stats is None or not stats.has_min_max:
                continue
            value = stats.max
            if isinstance(value, datetime):
                value = value if value.tzinfo else value.replace(tzinfo=UTC)
                current = newest[column]
                newest[column] = value if current is None else max(current, value)
    return metadata.num_rows, path.stat().st_size, newest["eventTime"], newest[INGEST_TIME]
