"""Reading stored events back: Parquet partitions plus not-yet-flushed staging segments.

Time bounds apply to an event's `eventTime` (when the apiserver recorded it) and, for events
without one, to `p_timestamp` (when auditwatch received it): a replayed old log is found at the
time it happened. `since` is inclusive, `until` exclusive. Partitions are pruned by their
p_timestamp minute: only those ending before `since - PARTITION_SKEW` are skipped (an event is
received after it happens, give or take clock skew), and `until` cannot prune (a batch can arrive
long after its events). Results come in time order; memory grows with the number of matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from auditwatch.config.schema import DURATION_PATTERN, parse_duration
from auditwatch.normalise import from_table, parse_event
from auditwatch.rules import ast
from auditwatch.schema import EVENT_JSON, EVENT_SCHEMA, EVENT_TIME, INGEST_TIME
from auditwatch.store.layout import check_stream_name, partition_files, segment_stem
from auditwatch.store.wal import STAGING_DIR, list_segments, read_segment

PARTITION_SKEW = timedelta(minutes=10)
"""How far an apiserver's clock may run ahead of auditwatch's without events being missed."""

_TIME_KEY = "time"


def parse_time_bound(text: str, now: datetime | None = None) -> datetime:
    """A query bound: a duration back from now (`1h`, `30m`, `2d`, spelled as in the CRDs) or an
    RFC 3339 time.

    A time without offset (`2024-05-01`, `2024-05-01T10:00:00`) is taken as UTC.
    """
    stripped = text.strip()
    if re.fullmatch(DURATION_PATTERN, stripped):
        return (now or datetime.now(UTC)) - parse_duration(stripped)
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: expected a duration such as 1h or an RFC 3339 time "
            "such as 2024-05-01T10:00:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def query(
    data_dir: Path,
    stream: str,
    *,
    condition: ast.Expr | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The stored events of `stream` matching `condition` within [since, until), in time order.

    Reads without locking, so it works beside a running receiver: a segment being written is
    read up to its last complete batch, and one converted meanwhile is read from its Parquet.
    """
    check_stream_name(stream)
    stream_dir = Path(data_dir) / stream
    if not stream_dir.is_dir():
        raise ValueError(f"no stream {stream!r} under {data_dir}")
    for name, bound in (("since", since), ("until", until)):
        if bound is not None and bound.tzinfo is None:
            raise ValueError(f"{name} must carry a time zone")
    evaluate = None
    if condition is not None:
        from auditwatch.rules.evaluate import compile_rule

        evaluate = compile_rule(condition).evaluate
    selected: list[pa.Table] = []
    for table in _stored_tables(stream_dir, since):
        times = pc.coalesce(table[EVENT_TIME], table[INGEST_TIME])
        keep = pa.chunked_array([pa.array([True] * table.num_rows)])
        if since is not None:
            keep = pc.and_(keep, pc.greater_equal(times, pa.scalar(since, times.type)))
        if until is not None:
            keep = pc.and_(keep, pc.less(times, pa.scalar(until, times.type)))
        if evaluate is not None:
            keep = pc.and_(keep, evaluate(from_table(table)))
        matched = pa.table(
            {_TIME_KEY: times, INGEST_TIME: table[INGEST_TIME], EVENT_JSON: table[EVENT_JSON]}
        )
        selected.append(matched.filter(keep))
    if not selected:
        return
    ordered = pa.concat_tables(selected).sort_by(
        [(_TIME_KEY, "ascending"), (INGEST_TIME, "ascending")]
    )
    for chunk in ordered[EVENT_JSON].chunks:
        for text in chunk.to_pylist():
            yield parse_event(text)


def _stored_tables(stream_dir: Path, since: datetime | None) -> Iterator[pa.Table]:
    """Every stored batch that may hold events from `since` on, each event exactly once.

    The segments are listed first: a Parquet file whose segment is still staged (a conversion
    in progress or cut by a crash) is skipped in favour of the segment.
    """
    segments = list_segments(stream_dir / STAGING_DIR)
    staged = {name.stem for name, _ in segments}
    prune = since - PARTITION_SKEW if since is not None else None
    yield from _parquet_tables(
        [f for _, f in partition_files(stream_dir, prune) if segment_stem(f) not in staged], prune
    )
    for name, path in segments:
        try:
            contents = read_segment(path, repair=False)
        except FileNotFoundError:
            yield from _parquet_tables(
                [f for _, f in partition_files(stream_dir, prune) if segment_stem(f) == name.stem],
                prune,
            )
            continue
        for batch in contents.batches:
            yield pa.Table.from_batches([batch])


def _parquet_tables(files: list[Path], since: datetime | None) -> Iterator[pa.Table]:
    if not files:
        return
    dataset = ds.dataset([str(f) for f in files], schema=EVENT_SCHEMA, format="parquet")
    row_filter = (
        ds.field(INGEST_TIME) >= pa.scalar(since, EVENT_SCHEMA.field(INGEST_TIME).type)
        if since
        else None
    )
    for batch in dataset.to_batches(filter=row_filter):
        if batch.num_rows:
            yield pa.Table.from_batches([batch])
