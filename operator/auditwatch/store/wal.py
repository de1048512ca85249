"""Staging segments: the write-ahead log that makes an acknowledged batch durable.

A segment is an Arrow IPC stream file (`pyarrow.ipc.open_stream` reads it) holding one record
batch per append. An append is written and fdatasync'ed before the store returns, so an
acknowledged batch survives a crash. A crash can only tear the batch being written, which was
never acknowledged: `read_segment(..., repair=True)` truncates the file after the last complete
batch. A batch is one IPC message, so it is kept whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from auditwatch.store.fsutil import fsync_dir

SEGMENT_SUFFIX = ".arrows"
STAGING_DIR = ".staging"
_SEGMENT_NAME = re.compile(r"^(?P<host>.+)\.(?P<id>\d{19})" + re.escape(SEGMENT_SUFFIX) + "$")


@dataclass(frozen=True)
class SegmentName:
    """`<host>.<id>.arrows`: the id is the creation time in ns, so names sort by age.

    The Parquet files of a segment are named `<host>.<id>.parquet` (its `stem`): converting the
    same segment twice overwrites them instead of duplicating data.
    """

    host: str
    id: int

    @property
    def stem(self) -> str:
        return f"{self.host}.{self.id:019d}"

    @property
    def file_name(self) -> str:
        return self.stem + SEGMENT_SUFFIX

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.id / 1e9, UTC)

    @classmethod
    def parse(cls, file_name: str) -> SegmentName | None:
        match = _SEGMENT_NAME.match(file_name)
        if match is None:
            return None
        return cls(match["host"], int(match["id"]))


def list_segments(staging: Path) -> list[tuple[SegmentName, Path]]:
    """The segments in a staging directory, oldest first (none if it does not exist)."""
    try:
        entries = list(staging.iterdir())
    except FileNotFoundError:
        return []
    named = [(SegmentName.parse(p.name), p) for p in entries]
    return sorted(((n, p) for n, p in named if n is not None), key=lambda item: item[0].id)


_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(use_threads=False)
"""Uncompressed, as Parseable stages: lz4 made segments 5x smaller but cost more CPU than all
the rule evaluation (compressing in the decoding workers, decompressing twice in the main
process); at 50k events/s that is 70 MB/s of writes instead of 14. Segments written compressed by
an earlier version still read (each message says how it is compressed). One thread: batches
are small, and handing their buffers to Arrow's thread pool cost more than it saved."""
_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)


def _messages(stream: pa.Buffer) -> list[pa.Buffer]:
    """The encapsulated IPC messages of a stream, as zero-copy slices (end marker excluded)."""
    reader = pa.BufferReader(stream)
    messages: list[pa.Buffer] = []
    start = 0
    while True:
        try:
            pa.ipc.read_message(reader)
        except EOFError:  # the end-of-stream marker
            return messages
        messages.append(stream.slice(start, reader.tell() - start))
        start = reader.tell()


def _encode_stream(schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=_WRITE_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue()


def encode_table(table: pa.Table) -> pa.Buffer:
    """A table as an IPC stream of one batch; `batch_message` of it is what a segment holds
    for the table.

    Encoding is CPU work the receiver's decoding workers do (`EventBatch.staged`), so appending
    a batch costs the store's process only a write and an fdatasync.
    """
    if table.num_rows:
        batch = pa.concat_batches(table.to_batches())
    else:
        batch = pa.RecordBatch.from_pylist([], schema=table.schema)
    return _encode_stream(batch.schema, [batch])


def batch_message(stream: pa.Buffer) -> pa.Buffer:
    """The record batch message of an `encode_table` stream (a zero-copy slice)."""
    _, message = _messages(stream)
    return message


def read_table(stream: pa.Buffer) -> pa.Table:
    """The table of an `encode_table` stream."""
    return pa.ipc.open_stream(stream, options=_READ_OPTIONS).read_all()


class SegmentWriter:
    """Appends encoded batches (`batch_message`) to a new segment file.

    A batch is durable once `sync` past its end returned: batches written while one fdatasync
    runs share the next one (group commit), so the disk's flush latency is paid once per group,
    not once per request, and outside the store's lock.

    After a failed write or sync the writer must be abandoned (`close()`): the segment is cut
    back to what was made durable (as far as the disk allows) and a fresh segment restarts the
    IPC stream cleanly.
    """

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.size = 0
        self._durable = 0
        self._failure: OSError | None = None
        self._sync_lock = threading.Lock()
        """Held through each fdatasync and by `close`: the descriptor is never synced while
        being closed."""
        (self._schema_message,) = _messages(_encode_stream(schema, []))
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fsync_dir(path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, message: pa.Buffer) -> int:
        """Write one encoded batch (after the schema, in a new segment).

        Returns the offset its bytes end at, for `sync`. The caller serialises writes. Raises
        OSError on failure.
        """
        if self._failure is not None:
            raise OSError(f"segment {self.path.name} failed earlier: {self._failure}")
        parts = [message] if self.size else [self._schema_message, message]
        written = 0
        try:
            for part in parts:
                data = memoryview(part)
                offset = 0
                while offset < len(data):
                    count = os.write(self._fd, data[offset:])
                    offset += count
                    written += count
        except OSError as error:
            self._failure = error
            raise
        self.size += written
        return self.size

    def durable_to(self, offset: int) -> bool:
        """Whether a sync already made the segment durable up to `offset`."""
        return self._durable >= offset

    def sync(self, offset: int) -> None:
        """Return once the segment is durable up to `offset`; raise OSError if it cannot be.

        One fdatasync covers everything written before it, so a caller whose batch a sync of
        another caller already covered returns at once.
        """
        with self._sync_lock:
            if self._durable >= offset:
                return
            if self._failure is not None:
                raise OSError(f"segment {self.path.name} failed earlier: {self._failure}")
            size = self.size  # written so far: at least `offset`
            try:
                os.fdatasync(self._fd)
            except OSError as error:
                self._failure = error
                raise
            self._durable = size

    def close(self) -> None:
        """Sync what was written and close. After a failure the file is cut back to what was
        durable instead (best effort: recovery drops a torn batch anyway), and `size` no longer
        counts the batches lost."""
        with self._sync_lock:
            try:
                if self._failure is None and self._durable < self.size:
                    try:
                        os.fdatasync(self._fd)
                        self._durable = self.size
                    except OSError as error:
                        self._failure = error
                if self._failure is not None:
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._durable)
                    self.size = self._durable
            finally:
                os.close(self._fd)


@dataclass
class SegmentContents:
    """The complete batches of a segment and where the last one ends."""

    schema: pa.Schema | None
    batches: list[pa.RecordBatch]
    valid_bytes: int

    @property
    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)


def read_segment(path: Path, *, repair: bool) -> SegmentContents:
    """Read the complete batches of a segment, stopping at a torn or corrupt tail.

    With `repair`, the file is truncated to its complete part (only the owner does this, at
    recovery; a reader of a segment being written just stops at the tail).
    """
    with pa.memory_map(str(path)) as source:
        data = source.read_buffer()  # mapped, not copied
    reader = pa.BufferReader(data)
    schema: pa.Schema | None = None
    batches: list[pa.RecordBatch] = []
    valid = 0
    while True:
        try:
            message = pa.ipc.read_message(reader)
            if schema is None:
                if message.type != "schema":
                    break
                schema = pa.ipc.read_schema(message)
            else:
                if message.type != "record batch":
                    break
                batch = pa.ipc.read_record_batch(message, schema)
                batch.validate()
                batches.append(batch)
        except (EOFError, OSError, pa.ArrowException):
            break
        valid = reader.tell()
    if not batches:
        valid = 0
    if repair and valid < len(data):
        with open(path, "r+b") as file:
            file.truncate(valid)
            os.fsync(file.fileno())
    return SegmentContents(schema if batches else None, batches, valid)
