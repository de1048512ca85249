"""The durable event store: a write-ahead staging log per stream, flushed to Parquet.

The receiver calls `append` from worker threads and answers 2xx only after it returned: by then
the new events are fdatasync'ed in a staging segment (`wal.py`). `flush` (called periodically)
turns segments older than `flush_interval` into hive-partitioned Parquet files. One `Store` owns
a data directory (an exclusive lock file), and its constructor recovers whatever a crashed
process left: torn segment tails are cut, closed segments wait for the next flush (so that the
engine can recount its alerts' matches in them first), and the dedup keys and statistics are
rebuilt from disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from auditwatch.normalise import EventBatch
from auditwatch.schema import EVENT_SCHEMA, EVENT_TIME, INGEST_TIME
from auditwatch.store.dedup import DEFAULT_MAX_KEYS, DEFAULT_WINDOW, Classified, DedupIndex
from auditwatch.store.errors import StorageUnavailable, StoreLocked
from auditwatch.store.fsutil import fsync_dir, make_dirs
from auditwatch.store.layout import (
    TEMP_SUFFIX,
    check_stream_name,
    minute_dirs,
    partition_files,
    segment_stem,
)
from auditwatch.store.parquet import file_summary, write_partitioned
from auditwatch.store.retention import Deleted, delete_partition, expired_partitions
from auditwatch.store.wal import (
    STAGING_DIR,
    SegmentName,
    SegmentWriter,
    batch_message,
    encode_table,
    list_segments,
    read_segment,
)

log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = timedelta(seconds=30)
DEFAULT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
"""A segment is converted to Parquet whole, in memory: this bounds a conversion to 64 MiB of
Arrow data (segments are uncompressed Arrow), about 45,000 events per Parquet file at most."""
DEFAULT_MAX_STAGED_BYTES = 1024 * 1024 * 1024
LOCK_FILE = ".lock"
PROBE_FILE = ".probe"
PROBE_BYTES = 4096
"""A block: on a full disk, writing it fails where a byte might still fit."""
_UNSAFE_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class StreamStats:
    """What a stream's status shows: events kept, bytes on disk, newest event times."""

    events: int
    bytes: int
    staged_bytes: int
    last_event_time: datetime | None
    """Newest `eventTime` (when the apiserver recorded it)."""
    last_received: datetime | None
    """Newest `p_timestamp` (when auditwatch received it)."""


@dataclass
class _ClosedSegment:
    name: SegmentName
    path: Path
    size: int


@dataclass(eq=False)
class _Unsynced:
    """A batch written but maybe not durable yet: its segment, where it ends, its keys."""

    writer: SegmentWriter
    segment: str
    """The segment's stem (`SegmentName.stem`)."""
    end: int
    keys: list[str]
    events: int
    bytes: int


@dataclass
class _Stream:
    """Per-stream state; `lock` serialises appends and guards every field."""

    name: str
    dir: Path
    dedup: DedupIndex
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: SegmentWriter | None = None
    writer_name: SegmentName | None = None
    closed: list[_ClosedSegment] = field(default_factory=list)
    unsynced: list[_Unsynced] = field(default_factory=list)
    """Batches between their write and the end of their sync, oldest first: a re-send of their
    events is a duplicate, but acknowledged only once they are durable."""
    events: int = 0
    parquet_bytes: int = 0
    staged_bytes: int = 0
    last_event_time: datetime | None = None
    last_received: datetime | None = None

    @property
    def staging(self) -> Path:
        return self.dir / STAGING_DIR

    def saw(self, event_time: datetime | None, received: datetime | None) -> None:
        if event_time is not None and (
            self.last_event_time is None or event_time > self.last_event_time
        ):
            self.last_event_time = event_time
        if received is not None and (self.last_received is None or received > self.last_received):
            self.last_received = received


def _newest(column: pa.ChunkedArray) -> datetime | None:
    value = pc.max(column).as_py()
    return value if isinstance(value, datetime) else None


class Store:
    """Durable, de-duplicated storage of event batches per stream (thread-safe).

    Bounded: `append` raises StorageUnavailable when writing fails or when more than
    `max_staged_bytes` wait for conversion to Parquet. The dedup index keeps the keys of the
    last `dedup_window` of ingest time, at most `dedup_max_keys` (see `dedup.py`).
    """

    def __init__(
        self,
        data_dir: Path,
        host: str | None = None,
        *,
        flush_interval: timedelta = DEFAULT_FLUSH_INTERVAL,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        max_staged_bytes: int = DEFAULT_MAX_STAGED_BYTES,
        dedup_window: timedelta = DEFAULT_WINDOW,
        dedup_max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = _UNSAFE_HOST_CHARS.sub("_", host or socket.gethostname())
        self.flush_interval = flush_interval
        self.segment_max_bytes = segment_max_bytes
        self.max_staged_bytes = max_staged_bytes
        self.dedup_window = dedup_window
        self.dedup_max_keys = dedup_max_keys
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        """Guards `_streams`, `_staged_total`, `_last_segment_id`."""
        self._flush_lock = threading.Lock()
        """One conversion or retention pass at a time: both rewrite partition directories."""
        self._staged_total = 0
        self._last_segment_id = 0
        self._closed = False
        self._failures: dict[str, str] = {}
        """Why writes fail now, by what failed ("append", "flush"); empty while they succeed."""
        make_dirs(self.data_dir)
        self._lock_fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"{self.data_dir} is in use by another auditwatch process") from None
        self._recover()

    # --- public API ---------------------------------------------------------------------

    def append(self, stream: str, batch: EventBatch) -> EventBatch:
        """Keep the events of `batch` not kept before; returns them once they are durable (and
        once the earlier copies of the events it left out are: a re-send may overtake them).

        Raises StorageUnavailable (nothing kept, nothing remembered: the retry stores it) or
        ValueError for a batch that does not have the event schema.
        """
        table = batch.table
        if not table.schema.equals(EVENT_SCHEMA):
            raise ValueError(
                "batch does not have the event schema (auditwatch.schema.EVENT_SCHEMA)"
            )
        state = self._stream(stream)
        if len(batch) == 0:
            return batch
        with state.lock:
            if self._closed:
                raise StorageUnavailable("the store is closed")
            classified = state.dedup.classify(table)
            originals = self._unsynced_originals(state, classified.kept_keys)
            written = self._write_new(state, batch, classified) if classified.any_new else None
        if written is not None:
            self._sync(state, written)
        self._await_durable(stream, originals)
        new = batch if classified.all_new else batch.filter(pa.array(classified.mask, pa.bool_()))
        new.segment = None if written is None else written.segment
        return new

    def _write_new(self, state: _Stream, batch: EventBatch, classified: Classified) -> _Unsynced:
        """Write the batch's new rows to the stream's segment (caller holds the lock).

        They are counted and their keys remembered now, so that a re-send arriving while they
        are being synced is a duplicate (acknowledged once they are durable); `_sync` undoes
        all of it if the sync fails.
        """
        table = batch.table
        new = table if classified.all_new else table.filter(pa.array(classified.mask))
        with self._lock:
            if self._staged_total > self.max_staged_bytes:
                raise StorageUnavailable(
                    f"{self._staged_total} bytes wait for conversion to Parquet "
                    f"(limit {self.max_staged_bytes})"
                )
        try:
            writer = state.writer or self._open_segment(state)
            assert state.writer_name is not None
            segment = state.writer_name.stem
            staged = batch.staged if classified.all_new else None
            if staged is None:
                staged = batch_message(encode_table(new))
            start = writer.size
            end = writer.write(staged)
        except OSError as error:
            self._abandon_writer(state)
            self._failures["append"] = str(error)
            raise StorageUnavailable(f"cannot write stream {state.name!r}: {error}") from error
        received = _newest(new[INGEST_TIME])
        assert received is not None  # p_timestamp is not nullable
        state.dedup.add(classified.new_keys, int(received.timestamp() * 1_000_000))
        written = _Unsynced(writer, segment, end, classified.new_keys, new.num_rows, end - start)
        state.unsynced.append(written)
        self._count(state, written.events, written.bytes)
        state.saw(_newest(new[EVENT_TIME]), received)
        if writer.size >= self.segment_max_bytes:
            self._rotate(state)
        return written

    def _sync(self, state: _Stream, written: _Unsynced) -> None:
        """Make a written batch durable, outside the lock (batches written meanwhile share the
        fdatasync); if that fails, undo its counts and keys and cut its segment back."""
        try:
            written.writer.sync(written.end)
        except OSError as error:
            self._failures["append"] = str(error)
            with state.lock:
                state.unsynced.remove(written)
                state.dedup.forget(written.keys)
                self._count(state, -written.events, -written.bytes)
                if state.writer is written.writer:
                    self._abandon_writer(state)
            raise StorageUnavailable(f"cannot write stream {state.name!r}: {error}") from error
        self._failures.pop("append", None)

    @staticmethod
    def _unsynced_originals(state: _Stream, kept_keys: list[str]) -> list[_Unsynced]:
        """The batches not yet known durable that hold events `kept_keys` name (caller holds
        the stream's lock); the durable ones are dropped from the list on the way."""
        state.unsynced = [u for u in state.unsynced if not u.writer.durable_to(u.end)]
        if not kept_keys or not state.unsynced:
            return []
        kept = set(kept_keys)
        return [u for u in state.unsynced if not kept.isdisjoint(u.keys)]

    @staticmethod
    def _await_durable(stream: str, originals: list[_Unsynced]) -> None:
        """Return once the batches holding a re-sent batch's events are durable (outside the
        lock); StorageUnavailable if one of them failed: the sender's retry then stores it."""
        for original in originals:
            try:
                original.writer.sync(original.end)
            except OSError as error:
                raise StorageUnavailable(
                    f"cannot write stream {stream!r}: an earlier copy of these events failed: "
                    f"{error}"
                ) from error

    def _count(self, state: _Stream, events: int, staged_bytes: int) -> None:
        state.events += events
        state.staged_bytes += staged_bytes
        with self._lock:
            self._staged_total += staged_bytes

    def seal(self, now: datetime | None = None, *, everything: bool = False) -> set[str]:
        """Close the segments being appended to that are older than `flush_interval` (all, with
        `everything`); returns the stems of every closed segment waiting for conversion.

        No event is written to a closed segment any more: a caller that waits for the appends
        in progress knows all of their events (the engine's alert counts do, see engine.py).
        """
        now = now or datetime.now(UTC)
        for state in self._all_streams():
            with state.lock:
                if state.writer_name is not None and (
                    everything or now - state.writer_name.created >= self.flush_interval
                ):
                    self._rotate(state)
        return self.staged_segments()

    def staged_segments(self) -> set[str]:
        """The stems of the closed segments of every stream waiting for conversion."""
        stems: set[str] = set()
        for state in self._all_streams():
            with state.lock:
                stems.update(c.name.stem for c in state.closed)
        return stems

    def staged(self, stream: str) -> list[tuple[str, pa.Table]]:
        """The closed segments of `stream` waiting for conversion: stem and events."""
        state = self._stream(stream)
        with state.lock:
            pending = list(state.closed)
        tables = []
        for segment in pending:
            batches = read_segment(segment.path, repair=False).batches
            tables.append((segment.name.stem, pa.Table.from_batches(batches, EVENT_SCHEMA)))
        return tables

    def flush(
        self,
        now: datetime | None = None,
        *,
        everything: bool = False,
        segments: set[str] | None = None,
    ) -> list[Path]:
        """Convert staged segments to Parquet; returns the Parquet files written.

        The segment being appended to is closed first when it is older than `flush_interval`
        (or always, with `everything`). Only `segments` (stems) are converted, if given.
        Raises StorageUnavailable when a file cannot be written; the segment stays staged and
        the next flush retries it.
        """
        written: list[Path] = []
        with self._flush_lock:
            try:
                self.seal(now, everything=everything)
                for state in self._all_streams():
                    written.extend(self._convert_closed(state, segments))
            except StorageUnavailable as error:
                self._failures["flush"] = error.reason
                raise
            self._failures.pop("flush", None)
        return written

    def write_failure(self) -> str | None:
        """Why storage writes fail now (the last failed append or flush), or None.

        Cleared by the next append or flush that succeeds, or by `probe`: readiness and the
        streams' Ready condition follow it.
        """
        failures = dict(self._failures)
        return "; ".join(f"{what}: {why}" for what, why in sorted(failures.items())) or None

    def probe(self) -> None:
        """Try a small durable write beside the streams; if it succeeds, a failed append no
        longer counts as failing (nobody may send while readiness says not ready)."""
        path = self.data_dir / PROBE_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, bytes(PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
        except OSError as error:
            self._failures["append"] = str(error)
            return
        self._failures.pop("append", None)

    def apply_retention(
        self, stream: str, retention: timedelta, now: datetime | None = None
    ) -> list[Path]:
        """Delete the partitions of `stream` entirely older than `now - retention`."""
        state = self._stream(stream)
        cutoff = (now or datetime.now(UTC)) - retention
        deleted: list[Deleted] = []
        with self._flush_lock:
            try:
                for partition in expired_partitions(state.dir, cutoff):
                    deleted.append(delete_partition(partition))
            finally:
                with state.lock:
                    state.events -= sum(d.rows for d in deleted)
                    state.parquet_bytes -= sum(d.bytes for d in deleted)
        return [d.path for d in deleted]

    def stats(self, stream: str) -> StreamStats:
        """Counters kept in memory: cheap enough for every status update."""
        check_stream_name(stream)
        with self._lock:
            state = self._streams.get(stream)
        if state is None:
            return StreamStats(0, 0, 0, None, None)
        with state.lock:
            return StreamStats(
                events=state.events,
                bytes=state.parquet_bytes + state.staged_bytes,
                staged_bytes=state.staged_bytes,
                last_event_time=state.last_event_time,
                last_received=state.last_received,
            )

    def streams(self) -> list[str]:
        """Streams that have data or were written to since start."""
        with self._lock:
            return sorted(self._streams)

    def close(self) -> None:
        """Flush everything to Parquet and release the data directory."""
        if self._closed:
            return
        try:
            self.flush(everything=True)
        finally:
            self._closed = True
            for state in self._all_streams():
                with state.lock:
                    self._rotate(state)
            os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _stream(self, stream: str) -> _Stream:
        check_stream_name(stream)
        with self._lock:
            state = self._streams.get(stream)
            if state is None:
                state = _Stream(
                    stream,
                    self.data_dir / stream,
                    DedupIndex(self.dedup_window, self.dedup_max_keys),
                )
                self._streams[stream] = state
            return state

    def _all_streams(self) -> list[_Stream]:
        with self._lock:
            return list(self._streams.values())

    def _open_segment(self, state: _Stream) -> SegmentWriter:
        make_dirs(state.staging)
        with self._lock:
            self._last_segment_id = max(time.time_ns(), self._last_segment_id + 1)
            name = SegmentName(self.host, self._last_segment_id)
        writer = SegmentWriter(state.staging / name.file_name, EVENT_SCHEMA)
        state.writer, state.writer_name = writer, name
        return writer

    def _rotate(self, state: _Stream) -> None:
        """Close the current segment; it waits in `closed` for conversion. Caller holds the lock."""
        writer, name = state.writer, state.writer_name
        if writer is None or name is None:
            return
        writer.close()
        state.writer = state.writer_name = None
        state.closed.append(_ClosedSegment(name, writer.path, writer.size))

    def _abandon_writer(self, state: _Stream) -> None:
        """After a failed write: close the segment, keeping what it durably holds."""
        writer = state.writer
        if writer is None:
            return
        try:
            self._rotate(state)
        except OSError:
            state.writer = state.writer_name = None
        if writer.size == 0:
            state.closed = [c for c in state.closed if c.path != writer.path]
            # An empty or torn segment left here is removed again by recovery.
            with contextlib.suppress(OSError):
                writer.path.unlink()

    def _convert_closed(self, state: _Stream, segments: set[str] | None) -> list[Path]:
        with state.lock:
            pending = [c for c in state.closed if segments is None or c.name.stem in segments]
        written: list[Path] = []
        for segment in pending:
            try:
                contents = read_segment(segment.path, repair=True)
                files: list[Path] = []
                if contents.batches:
                    table = pa.Table.from_batches(contents.batches)
                    files = write_partitioned(state.dir, segment.name.stem, table)
                segment.path.unlink()
                fsync_dir(segment.path.parent)
            except OSError as error:
                raise StorageUnavailable(
                    f"cannot convert {segment.path} to Parquet: {error}"
                ) from error
            size = sum(f.stat().st_size for f in files)
            with state.lock:
                state.closed.remove(segment)
                state.staged_bytes -= segment.size
                state.parquet_bytes += size
            with self._lock:
                self._staged_total -= segment.size
            written.extend(files)
        return written

    def _recover(self) -> None:
        for entry in sorted(self.data_dir.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                try:
                    check_stream_name(entry.name)
                except ValueError:
                    log.warning("ignoring %s: not a stream directory", entry)
                    continue
                state = self._stream(entry.name)
                with state.lock:
                    self._recover_stream(state)

    def _recover_stream(self, state: _Stream) -> None:
        """Cut torn segment tails, queue segments for conversion, rebuild stats and dedup keys."""
        staged: list[pa.Table] = []
        for name, path in list_segments(state.staging):
            contents = read_segment(path, repair=True)
            if not contents.batches:
                path.unlink()
                continue
            with self._lock:
                self._last_segment_id = max(self._last_segment_id, name.id)
            table = pa.Table.from_batches(contents.batches)
            staged.append(table)
            state.closed.append(_ClosedSegment(name, path, contents.valid_bytes))
            state.staged_bytes += contents.valid_bytes
            state.events += table.num_rows
            state.saw(_newest(table[EVENT_TIME]), _newest(table[INGEST_TIME]))
        with self._lock:
            self._staged_total += state.staged_bytes
        if staged:
            log.info(
                "stream %s: recovered %d staged segments (%d events)",
                state.name,
                len(staged),
                sum(t.num_rows for t in staged),
            )
        staged_stems = {c.name.stem for c in state.closed}
        for minute in minute_dirs(state.dir):
            for temp in minute.path.glob(".*" + TEMP_SUFFIX):
                temp.unlink()
        horizon = datetime.now(UTC) - self.dedup_window
        key_columns = ["auditID", "stage", INGEST_TIME]
        recent: list[pa.Table] = []
        for minute, file in partition_files(state.dir):
            if segment_stem(file) in staged_stems:
                continue  # a crash hit its conversion: the segment is converted again
            try:
                rows, size, event_time, received = file_summary(file)
                if minute.end > horizon:
                    recent.append(pq.read_table(file, columns=key_columns))
            except (OSError, pa.ArrowException) as error:
                log.warning("ignoring unreadable Parquet file %s: %s", file, error)
                continue
            state.events += rows
            state.parquet_bytes += size
            state.saw(event_time, received)
        for table in recent + [t.select(key_columns) for t in staged]:
            received = _newest(table[INGEST_TIME])
            if received is not None:
                classified = state.dedup.classify(table)
                state.dedup.add(classified.new_keys, int(received.timestamp() * 1_000_000))
