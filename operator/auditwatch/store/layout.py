"""Where Parquet files live: Parseable's hive layout `date=YYYY-MM-DD/hour=HH/minute=MM/`.

Partitions are cut by the UTC minute of `p_timestamp` (ingest time), so DuckDB
(`read_parquet('<data>/<stream>/**/*.parquet', hive_partitioning=true)`) and
`pyarrow.dataset(..., partitioning="hive")` read the data as Parseable's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

PARQUET_SUFFIX = ".parquet"
TEMP_SUFFIX = ".tmp"
"""Parquet files are written as `.<name>.tmp` (hidden: readers skip it) and then renamed."""

_STREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DATE = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_HOUR = re.compile(r"^hour=(\d{2})$")
_MINUTE = re.compile(r"^minute=(\d{2})$")


def check_stream_name(stream: str) -> None:
    """Stream names become directory names: refuse anything that could escape or hide."""
    if not _STREAM_NAME.match(stream) or len(stream) > 253:
        raise ValueError(
            f"invalid stream name {stream!r}: use letters, digits, '.', '_', '-' "
            "and start with a letter or digit"
        )


def partition_dir(stream_dir: Path, minute: datetime) -> Path:
    """The directory of the minute partition holding events received in `minute` (UTC)."""
    minute = minute.astimezone(UTC)
    return stream_dir / f"date={minute:%Y-%m-%d}" / f"hour={minute:%H}" / f"minute={minute:%M}"


@dataclass(frozen=True)
class Partition:
    """A date, hour or minute partition directory and the time span it covers."""

    path: Path
    start: datetime
    end: datetime


def _children(path: Path, pattern: re.Pattern[str]) -> list[tuple[str, Path]]:
    try:
        entries = sorted(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir():
            found.append((match.group(1), entry))
    return found


def date_partitions(stream_dir: Path) -> Iterator[Partition]:
    for value, path in _children(stream_dir, _DATE):
        try:
            start = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            continue
        yield Partition(path, start, start + timedelta(days=1))


def hour_partitions(date: Partition) -> Iterator[Partition]:
    for value, path in _children(date.path, _HOUR):
        if int(value) < 24:
            start = date.start + timedelta(hours=int(value))
            yield Partition(path, start, start + timedelta(hours=1))


def minute_partitions(hour: Partition) -> Iterator[Partition]:
    for value, path in _children(hour.path, _MINUTE):
        if int(value) < 60:
            start = hour.start + timedelta(minutes=int(value))
            yield Partition(path, start, start + timedelta(minutes=1))


def minute_dirs(stream_dir: Path, since: datetime | None = None) -> Iterator[Partition]:
    """The minute partitions of a stream, oldest first, skipping those that end before `since`
    (pruned on directory names, without opening files)."""
    for date in date_partitions(stream_dir):
        if since is not None and date.end <= since:
            continue
        for hour in hour_partitions(date):
            if since is not None and hour.end <= since:
                continue
            for minute in minute_partitions(hour):
                if since is None or minute.end > since:
                    yield minute


def partition_files(
    stream_dir: Path, since: datetime | None = None
) -> Iterator[tuple[Partition, Path]]:
    """Every Parquet file of a stream in minute partitions ending after `since`, oldest first."""
    for minute in minute_dirs(stream_dir, since):
        for file in sorted(minute.path.iterdir()):
            if file.name.endswith(PARQUET_SUFFIX) and not file.name.startswith("."):
                yield minute, file


def segment_stem(parquet_file: Path) -> str:
    """The segment a Parquet file was converted from (`<host>.<id>`)."""
    return parquet_file.name.removesuffix(PARQUET_SUFFIX)
