"""The store keeps every acknowledged event exactly once, on real files, across crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from tests.sample_data import SAMPLES

from auditwatch.normalise import EventBatch, normalise
from auditwatch.schema import EVENT_SCHEMA
from auditwatch.store import StorageUnavailable, Store, StoreLocked

OPERATOR_DIR = Path(__file__).resolve().parent.parent / "operator"
AT = datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)


def sample_events() -> list[dict[str, Any]]:
    lines = (SAMPLES / "impersonation-and-403s.log").read_text().splitlines()
    lines += (SAMPLES / "sekoia-mixed.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def events_with_ids(
    prefix: str, count: int, stage: str = "ResponseComplete"
) -> list[dict[str, Any]]:
    """Real sample events made distinct by auditID."""
    samples = sample_events()
    return [
        {**samples[i % len(samples)], "auditID": f"{prefix}-{i}", "stage": stage}
        for i in range(count)
    ]


def stored_ids(data: Path, stream: str) -> list[str]:
    """auditIDs in the Parquet files, read the way a user would (hive partitioning)."""
    dataset = ds.dataset(data / stream, format="parquet", partitioning="hive")
    return list(dataset.to_table(columns=["auditID"])["auditID"].to_pylist())


def snapshot(data: Path, tmp_path: Path, name: str) -> Path:
    """The files of a live store as a crash right now would leave them (all appends fsync'ed)."""
    copy = tmp_path / name
    shutil.copytree(data, copy)
    (copy / ".lock").unlink()
    return copy


def ids(batch: EventBatch) -> list[str | None]:
    return [event.get("auditID") for event in batch.events]


def test_flush_writes_zstd_parquet_in_hive_minute_partitions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Store(data, host="node-1") as store:
        store.append("audit", normalise(events_with_ids("a", 5), AT))
        store.append("audit", normalise(events_with_ids("b", 3), AT + timedelta(minutes=1)))
        written = store.flush(everything=True)

    assert len(written) == 2
    first, second = sorted(written)
    assert first.parent == data / "audit" / "date=2024-05-01" / "hour=10" / "minute=15"
    assert second.parent == data / "audit" / "date=2024-05-01" / "hour=10" / "minute=16"
    assert first.name.startswith("node-1.") and first.name.endswith(".parquet")
    assert first.name == second.name  # one segment, one file name per partition
    metadata = pq.read_metadata(first)
    assert metadata.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(first).equals(EVENT_SCHEMA)
    assert list(data.joinpath("audit", ".staging").iterdir()) == []

    table = ds.dataset(data / "audit", format="parquet", partitioning="hive").to_table()
    rows = sorted(zip(table["auditID"].to_pylist(), table["minute"].to_pylist(), strict=True))
    assert rows == sorted([(f"a-{i}", 15) for i in range(5)] + [(f"b-{i}", 16) for i in range(3)])
    originals = {e["auditID"]: e for e in events_with_ids("a", 5)}
    for text, audit_id in zip(
        table["event"].to_pylist(), table["auditID"].to_pylist(), strict=True
    ):
        if audit_id in originals:
            assert json.loads(text) == originals[audit_id]


def test_duplicates_within_and_across_batches_are_stored_once(tmp_path: Path) -> None:
    events = events_with_ids("x", 4)
    no_id = {k: v for k, v in events[0].items() if k != "auditID"}
    with Store(tmp_path, host="h") as store:
        first = store.append("s", normalise([*events, events[1], no_id], AT))
        again = store.append(
            "s", normalise([events[2], no_id, {**events[2], "stage": "Panic"}], AT)
        )
        replay = store.append("s", normalise(events, AT))

    assert ids(first) == ["x-0", "x-1", "x-2", "x-3", None]
    assert ids(again) == [None, "x-2"]  # events without auditID are never dropped
    assert again.events[1]["stage"] == "Panic"
    assert len(replay) == 0
    assert sorted(stored_ids(tmp_path, "s"), key=str) == sorted(
        ["x-0", "x-1", "x-2", "x-2", "x-3", None, None], key=str
    )


def test_duplicates_are_recognised_after_restart_from_parquet_and_staging(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    data = tmp_path / "data"
    with Store(data) as store:
        store.append("s", normalise(events_with_ids("flushed", 3), now))
    store = Store(data)
    store.append("s", normalise(events_with_ids("staged", 3), now))
    crashed = snapshot(data, tmp_path, "crashed")
    store.close()

    with Store(crashed) as recovered:
        assert len(recovered.append("s", normalise(events_with_ids("flushed", 3), now))) == 0
        assert len(recovered.append("s", normalise(events_with_ids("staged", 3), now))) == 0
        assert len(recovered.append("s", normalise(events_with_ids("new", 2), now))) == 2
    assert sorted(stored_ids(crashed, "s")) == sorted(
        [f"flushed-{i}" for i in range(3)] + [f"staged-{i}" for i in range(3)] + ["new-0", "new-1"]
    )


def test_dedup_forgets_keys_older_than_its_window(tmp_path: Path) -> None:
    event = events_with_ids("w", 1)
    with Store(tmp_path, dedup_window=timedelta(minutes=5)) as store:
        store.append("s", normalise(event, AT))
        assert len(store.append("s", normalise(event, AT + timedelta(minutes=4)))) == 0
        store.append("s", normalise(events_with_ids("later", 1), AT + timedelta(minutes=6)))
        assert len(store.append("s", normalise(event, AT + timedelta(minutes=6)))) == 1


def test_torn_tail_is_cut_and_complete_batches_survive_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = Store(data)
    for name in ("one", "two", "three"):
        store.append("s", normalise(events_with_ids(name, 10), AT))
    crashed = snapshot(data, tmp_path, "crashed")
    store.close()
    (segment,) = (crashed / "s" / ".staging").iterdir()
    size = segment.stat().st_size
    with open(segment, "r+b") as file:
        file.truncate(size - 7)

    with Store(crashed) as recovered:
        assert recovered.stats("s").events == 20
        # "three" was never acknowledged (torn): its retry is new, not a duplicate.
        assert len(recovered.append("s", normalise(events_with_ids("three", 10), AT))) == 10
    assert sorted(stored_ids(crashed, "s")) == sorted(
        f"{name}-{i}" for name in ("one", "two", "three") for i in range(10)
    )


def test_crash_between_parquet_write_and_segment_delete_leaves_no_duplicates(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    store = Store(data)
    store.append("s", normalise(events_with_ids("p", 20), AT))
    crashed = snapshot(data, tmp_path, "crashed")  # segment staged, not converted
    (written,) = store.flush(everything=True)
    store.close()
    partition = crashed / written.relative_to(data).parent
    partition.mkdir(parents=True)
    shutil.copy(written, partition / written.name)  # the Parquet file of the staged segment
    (partition / f".{written.name}.tmp").write_bytes(b"half a file")

    with Store(crashed) as recovered:
        assert recovered.stats("s").events == 20
    assert sorted(stored_ids(crashed, "s")) == sorted(f"p-{i}" for i in range(20))
    assert [p.name for p in partition.iterdir()] == [written.name]


def test_failed_write_keeps_nothing_and_the_retry_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    store.append("s", normalise(events_with_ids("ok", 5), AT))
    real_write = os.write

    def disk_full_halfway(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_halfway)
    with pytest.raises(StorageUnavailable, match="No space left"):
        store.append("s", normalise(events_with_ids("failed", 5), AT))
    monkeypatch.undo()

    assert len(store.append("s", normalise(events_with_ids("failed", 5), AT))) == 5
    assert store.stats("s").events == 10
    store.close()
    assert sorted(stored_ids(tmp_path, "s")) == sorted(
        [f"ok-{i}" for i in range(5)] + [f"failed-{i}" for i in range(5)]
    )


def test_unwritable_stream_directory_is_storage_unavailable(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        (tmp_path / "blocked").write_text("a file where the stream directory should be")
        with pytest.raises(StorageUnavailable, match="blocked"):
            store.append("blocked", normalise(events_with_ids("b", 1), AT))
        assert len(store.append("fine", normalise(events_with_ids("b", 1), AT))) == 1


def test_staging_limit_refuses_new_data_until_flushed(tmp_path: Path) -> None:
    with Store(tmp_path, max_staged_bytes=1) as store:
        store.append("s", normalise(events_with_ids("first", 5), AT))
        with pytest.raises(StorageUnavailable, match="limit 1"):
            store.append("s", normalise(events_with_ids("second", 5), AT))
        # A re-send of kept events needs no space: it is acknowledged.
        assert len(store.append("s", normalise(events_with_ids("first", 5), AT))) == 0
        store.flush(everything=True)
        assert store.stats("s").staged_bytes == 0
        assert len(store.append("s", normalise(events_with_ids("second", 5), AT))) == 5


def test_flush_rotates_only_segments_older_than_the_interval(tmp_path: Path) -> None:
    with Store(tmp_path, flush_interval=timedelta(seconds=30)) as store:
        store.append("s", normalise(events_with_ids("f", 3), AT))
        assert store.flush(datetime.now(UTC)) == []
        assert len(store.flush(datetime.now(UTC) + timedelta(seconds=31))) == 1
        assert store.stats("s").staged_bytes == 0


def test_retention_deletes_only_partitions_entirely_older(tmp_path: Path) -> None:
    now = datetime(2024, 5, 3, 12, 30, tzinfo=UTC)
    times = {
        "day-old": datetime(2024, 5, 1, 9, 0, tzinfo=UTC),
        "hour-old": datetime(2024, 5, 3, 10, 5, tzinfo=UTC),
        "minute-old": datetime(2024, 5, 3, 11, 29, tzinfo=UTC),
        "boundary": datetime(2024, 5, 3, 11, 30, 10, tzinfo=UTC),
        "recent": datetime(2024, 5, 3, 12, 29, tzinfo=UTC),
    }
    with Store(tmp_path) as store:
        for name, at in times.items():
            store.append("s", normalise(events_with_ids(name, 2), at))
        store.flush(everything=True)
        deleted = store.apply_retention("s", timedelta(hours=1), now)
        stats = store.stats("s")

    stream = tmp_path / "s"
    assert sorted(deleted) == sorted(
        [
            stream / "date=2024-05-01",
            stream / "date=2024-05-03" / "hour=10",
            stream / "date=2024-05-03" / "hour=11" / "minute=29",
        ]
    )
    assert sorted(stored_ids(tmp_path, "s")) == ["boundary-0", "boundary-1", "recent-0", "recent-1"]
    assert stats.events == 4


def test_stats_count_events_and_survive_restart(tmp_path: Path) -> None:
    events = events_with_ids("st", 7)
    with Store(tmp_path) as store:
        store.append("s", normalise(events, AT))
        stats = store.stats("s")
    newest_event_time = max(
        datetime.fromisoformat(e.get("stageTimestamp") or e["timestamp"]) for e in events
    )
    assert stats.events == 7
    assert stats.bytes > 0
    assert stats.last_received == AT
    assert stats.last_event_time == newest_event_time
    with Store(tmp_path) as reopened:
        again = reopened.stats("s")
    assert (again.events, again.last_received, again.last_event_time) == (
        7,
        AT,
        newest_event_time,
    )
    assert again.bytes == sum(p.stat().st_size for p in (tmp_path / "s").rglob("*.parquet"))


def test_concurrent_appends_of_overlapping_batches_store_each_event_once(tmp_path: Path) -> None:
    events = events_with_ids("c", 400)
    returned: list[int] = []
    with Store(tmp_path) as store:

        def send(offset: int) -> None:
            for start in range(offset, 400, 50):
                got = store.append("s", normalise(events[start : start + 100], AT))
                returned.append(len(got))

        threads = [threading.Thread(target=send, args=(o,)) for o in (0, 0, 25, 50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(returned) == 400
    assert sorted(stored_ids(tmp_path, "s")) == sorted(e["auditID"] for e in events)


def test_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path), pytest.raises(StoreLocked):
        Store(tmp_path)


def test_bad_stream_name_and_bad_schema_are_clear_errors(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        with pytest.raises(ValueError, match="invalid stream name"):
            store.append("../etc", normalise(events_with_ids("n", 1), AT))
        wrong = EventBatch(pa.table({"auditID": ["x"]}))
        with pytest.raises(ValueError, match="event schema"):
            store.append("s", wrong)


CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_store import events_with_ids
from auditwatch.normalise import normalise
from auditwatch.store import Store

store = Store(Path({data!r}), flush_interval=timedelta(0), segment_max_bytes=200_000)
for n in range(100000):
    batch = normalise(events_with_ids(f"k-{{n}}", 50), datetime.now(UTC))
    store.append("s", batch)
    if n % 2:
        store.append("s", batch)  # a re-send
    print(n, flush=True)
    if n % 5 == 4:
        store.flush()
"""


def test_sigkilled_writer_loses_no_acknowledged_event_and_duplicates_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    script = CHILD.format(tests=str(Path(__file__).parent), data=str(data))
    env = {**os.environ, "PYTHONPATH": str(OPERATOR_DIR)}
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    acknowledged = []
    for line in child.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 23:
            os.kill(child.pid, signal.SIGKILL)
            break
    assert child.wait() == -signal.SIGKILL
    acknowledged.extend(int(line) for line in child.stdout.read().splitlines())

    with Store(data) as store:
        store.flush(everything=True)
    stored = stored_ids(data, "s")
    assert len(stored) == len(set(stored))
    expected = {f"k-{n}-{i}" for n in acknowledged for i in range(50)}
    assert expected <= set(stored)


def test_unreadable_parquet_file_does_not_stop_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store(tmp_path) as store:
        store.append("s", normalise(events_with_ids("r", 3), AT))
    broken = tmp_path / "s" / "date=2024-05-01" / "hour=10" / "minute=16" / "other.1.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"not parquet")

    with Store(tmp_path) as store:
        assert store.stats("s").events == 3
        assert len(store.append("s", normalise(events_with_ids("r2", 3), AT))) == 3
    assert str(broken) in caplog.text


def test_failed_sync_keeps_nothing_and_the_retry_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fdatasync failing (an I/O error under the page cache): the batch is refused, forgotten by
    de-duplication and cut from the segment, so its retry is stored exactly once."""
    store = Store(tmp_path)
    store.append("s", normalise(events_with_ids("ok", 5), AT))

    def io_error(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", io_error)
    with pytest.raises(StorageUnavailable, match="Input/output error"):
        store.append("s", normalise(events_with_ids("failed", 5), AT))
    monkeypatch.undo()

    assert store.stats("s").events == 5
    assert len(store.append("s", normalise(events_with_ids("failed", 5), AT))) == 5
    assert len(store.append("s", normalise(events_with_ids("failed", 5), AT))) == 0
    store.close()
    assert sorted(stored_ids(tmp_path, "s")) == sorted(
        [f"ok-{i}" for i in range(5)] + [f"failed-{i}" for i in range(5)]
    )


def test_concurrent_appends_are_each_durable_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends from many threads (as the receiver makes them) share fdatasyncs, and every one
    returns only once a sync after its write has finished."""
    synced: list[float] = []
    real_fdatasync = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(0.01)  # a disk's flush latency, so that writes pile up behind it
        real_fdatasync(fd)
        synced.append(time.monotonic())

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    returned: list[float] = []
    with Store(tmp_path) as store:

        def post(thread: int) -> None:
            for batch in range(10):
                store.append("s", normalise(events_with_ids(f"t{thread}-{batch}", 4), AT))
                returned.append(time.monotonic())

        threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.stats("s").events == 8 * 10 * 4
    assert len(synced) < 80  # shared: fewer syncs than appends
    assert all(any(done <= answer for done in synced) for answer in returned)
    expected = [f"t{t}-{b}-{i}" for t in range(8) for b in range(10) for i in range(4)]
    assert sorted(stored_ids(tmp_path, "s")) == sorted(expected)


@pytest.mark.parametrize("sync_fails", [False, True], ids=["sync succeeds", "sync fails"])
def test_a_resend_during_the_originals_sync_waits_for_its_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_fails: bool
) -> None:
    """The apiserver re-sends a batch whose answer was late: the copy must not be acknowledged
    as a duplicate before the original is durable, nor at all if the original's sync fails."""
    in_sync, release = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync
    finished: list[float] = []

    def held_fdatasync(fd: int) -> None:
        in_sync.set()
        release.wait(10)
        finished.append(time.monotonic())
        if sync_fails:
            raise OSError(5, "Input/output error")
        real_fdatasync(fd)

    store = Store(tmp_path)
    monkeypatch.setattr(os, "fdatasync", held_fdatasync)
    outcome: dict[str, Any] = {}

    def original() -> None:
        try:
            outcome["original"] = len(store.append("s", normalise(events_with_ids("r", 5), AT)))
        except StorageUnavailable as error:
            outcome["original"] = error

    writer = threading.Thread(target=original)
    writer.start()
    assert in_sync.wait(10)
    threading.Timer(0.2, release.set).start()
    try:
        resent = len(store.append("s", normalise(events_with_ids("r", 5), AT)))
    except StorageUnavailable as error:
        resent = error
    answered = time.monotonic()
    writer.join(10)
    monkeypatch.undo()

    assert finished and answered >= finished[0]
    if sync_fails:
        assert isinstance(outcome["original"], StorageUnavailable)
        assert isinstance(resent, StorageUnavailable)
        assert len(store.append("s", normalise(events_with_ids("r", 5), AT))) == 5
    else:
        assert (outcome["original"], resent) == (5, 0)
    store.close()
    assert sorted(stored_ids(tmp_path, "s")) == sorted(f"r-{i}" for i in range(5))
