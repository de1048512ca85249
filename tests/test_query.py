"""Querying stored events: time bounds, rules, Parquet plus staging, each event once, in order."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from tests.sample_data import SAMPLES

from auditwatch.config.schema import parse_duration
from auditwatch.normalise import normalise
from auditwatch.rules.parse import parse_expression
from auditwatch.rules.reference import matches
from auditwatch.store import Store, parse_time_bound, query

AT = datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SAMPLES / name).read_text().splitlines() if line.strip()]


def at_time(prefix: str, moments: list[datetime]) -> list[dict[str, Any]]:
    """Sample events recorded at the given moments (stageTimestamp), with distinct auditIDs."""
    samples = load("sekoia-mixed.log")
    return [
        {
            **samples[i % len(samples)],
            "auditID": f"{prefix}-{i}",
            "stageTimestamp": moment.isoformat().replace("+00:00", "Z"),
        }
        for i, moment in enumerate(moments)
    ]


def audit_ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["auditID"] for e in events]


def test_query_reads_parquet_and_staging_once_in_event_time_order(tmp_path: Path) -> None:
    early = at_time("early", [AT + timedelta(seconds=s) for s in (5, 1, 3)])
    late = at_time("late", [AT + timedelta(seconds=s) for s in (4, 2)])
    with Store(tmp_path) as store:
        store.append("s", normalise(early, AT + timedelta(minutes=1)))
        store.flush(everything=True)
        store.append("s", normalise(late, AT + timedelta(minutes=2)))  # still staged
        found = list(query(tmp_path, "s"))

    assert audit_ids(found) == ["early-1", "late-1", "early-2", "late-0", "early-0"]
    assert found[0] == early[1]  # the original event, unchanged


def test_since_and_until_bound_event_time_or_receive_time_without_it(tmp_path: Path) -> None:
    events = at_time("e", [AT - timedelta(hours=2), AT - timedelta(minutes=30), AT])
    undated = {k: v for k, v in events[0].items() if k not in ("stageTimestamp", "timestamp")}
    undated["auditID"] = "undated"
    undated.pop("requestReceivedTimestamp", None)
    with Store(tmp_path) as store:
        store.append("s", normalise(events, AT + timedelta(seconds=5)))
        store.append("s", normalise([undated], AT - timedelta(minutes=10)))
        store.flush(everything=True)

    def between(since: datetime | None, until: datetime | None) -> list[str]:
        return audit_ids(list(query(tmp_path, "s", since=since, until=until)))

    assert between(AT - timedelta(hours=1), None) == ["e-1", "undated", "e-2"]
    assert between(None, AT) == ["e-0", "e-1", "undated"]  # until is exclusive
    assert between(AT - timedelta(hours=3), AT - timedelta(minutes=15)) == ["e-0", "e-1"]
    assert between(AT + timedelta(seconds=1), None) == []


def test_condition_selects_what_the_rule_means(tmp_path: Path) -> None:
    events = load("secret-recon-then-exec.log") + load("impersonation-and-403s.log")
    rule = parse_expression('objectRef.resource = "secrets" and responseStatus.code = 403')
    with Store(tmp_path) as store:
        store.append("s", normalise(events[:20], AT))
        store.flush(everything=True)
        store.append("s", normalise(events[20:], AT + timedelta(seconds=1)))
        found = list(query(tmp_path, "s", condition=rule))

    expected = [e for e in events if matches(rule, e)]
    assert expected  # the samples do contain denied secret reads
    assert sorted(audit_ids(found)) == sorted(audit_ids(expected))


def test_crash_state_with_parquet_and_its_segment_reads_each_event_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Store(data) as store:
        store.append("s", normalise(at_time("c", [AT] * 5), AT))
        staged = shutil.copytree(data, tmp_path / "staged")
        store.flush(everything=True)
    for parquet in data.rglob("*.parquet"):
        target = staged / parquet.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parquet, target)

    assert sorted(audit_ids(list(query(staged, "s")))) == [f"c-{i}" for i in range(5)]


def test_since_prunes_old_partitions_without_opening_them(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.append(
            "s", normalise(at_time("old", [AT - timedelta(days=1)]), AT - timedelta(days=1))
        )
        store.append("s", normalise(at_time("new", [AT]), AT))
        store.flush(everything=True)
    old_day = tmp_path / "s" / f"date={(AT - timedelta(days=1)):%Y-%m-%d}"
    for parquet in old_day.rglob("*.parquet"):
        parquet.write_bytes(b"not parquet")

    assert audit_ids(list(query(tmp_path, "s", since=AT - timedelta(hours=1)))) == ["new-0"]
    with pytest.raises(pa.ArrowInvalid, match="Parquet"):
        list(query(tmp_path, "s"))


def test_unknown_stream_and_naive_bounds_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stream 'missing'"):
        list(query(tmp_path, "missing"))
    (tmp_path / "s").mkdir()
    with pytest.raises(ValueError, match="time zone"):
        list(query(tmp_path, "s", since=datetime(2024, 1, 1)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("3m 20s", timedelta(minutes=3, seconds=20)),
        ("2d", timedelta(days=2)),
        ("1w", timedelta(weeks=1)),
    ],
)
def test_durations_count_back_from_now(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_time_bound(text, now=AT) == AT - expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00.5Z", datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ],
)
def test_times_are_rfc3339_and_utc_without_offset(text: str, expected: datetime) -> None:
    assert parse_time_bound(text) == expected


@pytest.mark.parametrize("text", ["", "1x", "1h-", "yesterday", "2024-13-01"])
def test_bad_time_bounds_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a duration"):
        parse_time_bound(text)
