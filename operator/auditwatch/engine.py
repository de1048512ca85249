"""The core of a running auditwatch: config in force, storage, rule evaluation, alert state.

Both front ends drive one `Engine`: `serve` feeds it AuditStream/AuditAlert YAML files, the
operator feeds it the same resources from the Kubernetes API; the receiver hands it request
bodies. It knows nothing of HTTP or kopf.

Data flow of one accepted request: normalise -> store (de-duplicated, durable) -> evaluate the
stream's rules on the events that were new -> alert trackers -> notifications. Rules only ever
see events that were stored for the first time, so a batch the apiserver re-sends is neither
kept nor counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from auditwatch import exactjson
from auditwatch.alerts import AlertTracker, Notice, SnapshotError, continues, kept_status
from auditwatch.config.build import check_stream
from auditwatch.config.model import AlertSpec, ConfigError, InvalidAlert, StreamSpec
from auditwatch.groups import GroupedTracker
from auditwatch.metrics import Metrics
from auditwatch.normalise import EventBatch, from_table
from auditwatch.notify import Notifier
from auditwatch.rules.plan import PlanAlert, StreamPlan
from auditwatch.rules.window import GroupedRows
from auditwatch.status import ALERT_KEY, STREAM_KEY, Conditions, alert_status, iso, stream_status
from auditwatch.store import Store

logger = logging.getLogger(__name__)

STATE_FILE = Path(".state") / "alerts.json"
"""Alert trackers' snapshots, below the data directory (stream names cannot start with a dot)."""

MAX_TICK = timedelta(seconds=1)
"""Longest sleep of the background loop: flushes and state saves happen at least this often."""

RETENTION_EVERY = timedelta(minutes=5)


def utcnow() -> datetime:
    return datetime.now(UTC)


Tracker = AlertTracker | GroupedTracker


def _tracker_type(spec: AlertSpec) -> type[AlertTracker] | type[GroupedTracker]:
    """Alerts with a threshold count per group (groups.py), the others as a whole."""
    return AlertTracker if spec.threshold is None else GroupedTracker


@dataclass
class _LiveAlert:
    spec: AlertSpec
    tracker: Tracker


class _StagedCount(NamedTuple):
    """An alert's matches and excepted events among the events of one staging segment."""

    matches: int
    excepted: int


@dataclass(frozen=True)
class _Matched:
    """What one request's events did to one alert."""

    alert: _LiveAlert
    count: int
    latest: dict[str, Any] | None
    """The last matching event (None when all were excepted)."""
    segment: str | None
    """The staging segment holding the events (see `Engine._staged`)."""
    excepted: int = 0
    """Events the rule matched that the alert's exceptions excepted."""
    groups: GroupedRows | None = None
    """With a threshold: the matches by group; `event` reads the rows they name (each
    parsed once: the last row is already, by the time the tracker reads it)."""
    event: Callable[[int], dict[str, Any]] | None = None


def _saved_sum(saved: Mapping[str, Any], name: str, stems: set[str]) -> int:
    """The sum of a saved per-segment count (`stagedMatches`, `stagedExcepted`) over `stems`."""
    counts = saved.get(name)
    if not isinstance(counts, dict):
        return 0
    return sum(int(n) for stem, n in counts.items() if stem in stems)


def _stream_plan(alerts: Sequence[_LiveAlert]) -> StreamPlan:
    """All `alerts` of one stream compiled together, each seeing what its stream grants it."""
    return StreamPlan(
        [
            PlanAlert(
                a.spec.key,
                a.spec.rule.condition,
                scope=a.spec.scope,
                unless=a.spec.unless,
                group_by=None if a.spec.threshold is None else a.spec.threshold.columns,
            )
            for a in alerts
        ]
    )


class Engine:
    """Everything between an accepted request body and a notification."""

    def __init__(
        self,
        data_dir: Path,
        *,
        store: Store | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.metrics = Metrics()
        self.store = store or Store(self.data_dir)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.config_loaded = False
        self._streams: dict[str, StreamSpec] = {}
        self._alerts: dict[str, _LiveAlert] = {}
        self._by_stream: dict[str, tuple[_LiveAlert, ...]] = {}
        self._plans: dict[str, StreamPlan] = {}
        """Per stream, all its alerts compiled into one evaluation plan (`rules/plan.py`)."""
        self._invalid: dict[str, InvalidAlert] = {}
        self._problems: list[str] = []
        self._since: dict[str, datetime] = {}
        """When each stream and alert was created (else first applied): the AGE of `auditwatch
        status`."""
        self._conditions = Conditions()
        self._state_path = self.data_dir / STATE_FILE
        self._saved = self._load_state()
        self._dirty = False
        self._deliveries: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event | None = None
        self._last_retention = datetime.min.replace(tzinfo=UTC)
        self._staged: dict[str, dict[str, _StagedCount]] = {}
        """Per alert, its matches and excepted events among the events of each staging segment
        not yet converted to Parquet. Saved with the state: after a crash, the segments still
        staged are recounted (`_recount_staged`) and replace these, so `matches` and `excepted`
        equal the events stored however many were acknowledged, re-sent or lost with the
        process."""
        self._ingests: set[asyncio.Future[None]] = set()
        """Ingests in progress: a segment is converted only once those that may have written
        to it have counted their matches and the counts were saved."""

    # -- configuration ----------------------------------------------------------------------

    def apply(
        self,
        streams: Mapping[str, StreamSpec],
        alerts: Mapping[str, AlertSpec],
        invalid: Mapping[str, InvalidAlert] | None = None,
        problems: list[str] | None = None,
        namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
        created: Mapping[str, datetime] | None = None,
    ) -> None:
        """Put a complete configuration in force; alerts keep their state where their rule did.

        `created`: when streams and alerts (by name / key) were created, where known (a
        resource's metadata.creationTimestamp): the AGE of `auditwatch status`; otherwise when
        this process first applied them.

        An alert on a stream that is not defined becomes Invalid (StreamNotFound), one from a
        namespace the stream does not admit too (StreamNotGranted); the others see what their
        stream grants them (`config.build.check_stream`, given `namespace_labels`). An Invalid
        alert stops matching but keeps its state, counts and delivery records (saved, so across a
        restart too), and continues from them when it is usable again: a stream or Secret that is
        briefly missing (deleted and re-created, or applied in another order) loses nothing.
        While Invalid it sends nothing; a firing alert resolves normally once back. Alerts in
        neither `alerts` nor `invalid` (deleted) stop matching at once and their state is
        dropped. `problems` are configuration errors to show in the status (a file that does not
        parse, say).

        The first call must carry the complete configuration: saved state of alerts absent from
        it (deleted while auditwatch was down) is dropped then.
        """
        invalid = dict(invalid or {})
        live: dict[str, _LiveAlert] = {}
        for key, spec in alerts.items():
            try:
                spec = check_stream(spec, streams, namespace_labels)
            except ConfigError as error:
                invalid[key] = InvalidAlert(
                    spec.namespace,
                    spec.name,
                    spec.stream,
                    error.reason,
                    error.message,
                    spec.generation,
                )
                continue
            live[key] = self._live_alert(key, spec)
        for key in set(self._alerts) - set(live):
            if key in invalid:  # kept for its return, and shown in its Invalid status
                self._saved[key] = self._alerts[key].tracker.snapshot()
                self._dirty = True
        for key in (set(self._alerts) | set(self._invalid)) - set(live) - set(invalid):
            self.notifier.forget(key)
            self._saved.pop(key, None)
            self._dirty = True
        if not self.config_loaded:
            for key in set(self._saved) - set(live) - set(invalid):
                del self._saved[key]
                self._dirty = True
            self._recount_staged(live)
        by_stream: dict[str, list[_LiveAlert]] = {}
        for alert in live.values():
            by_stream.setdefault(alert.spec.stream, []).append(alert)
        self._streams = dict(streams)
        self._alerts = live
        self._plans = {name: self._plan(name, tuple(alerts)) for name, alerts in by_stream.items()}
        self._by_stream = {name: tuple(alerts) for name, alerts in by_stream.items()}
        self._invalid = invalid
        self._problems = list(problems or [])
        now = self.clock()
        created = created or {}
        self._since = {
            key: created.get(key) or self._since.get(key, now)
            for key in [*streams, *live, *invalid]
        }
        readiness = {STREAM_KEY.format(name): True for name in streams}
        readiness |= {ALERT_KEY.format(key): True for key in live}
        readiness |= {ALERT_KEY.format(key): False for key in invalid}
        self._conditions.forget(set(readiness))
        for key, ok in readiness.items():  # Ready's lastTransitionTime is when this applied
            self._conditions.note(key, ok, now)
        self.config_loaded = True
        self._wake()

    def _recount_staged(self, live: Mapping[str, _LiveAlert]) -> None:
        """After a restart: each restored alert's matches and excepted events in the segments
        still staged, counted from the events, replace the counts saved for them (events stored
        but not counted before a crash, counted but not saved, or acknowledged late and re-sent
        as duplicates). Each stream's restored alerts are counted together, in one plan, as at
        ingest."""
        restored: dict[str, list[_LiveAlert]] = {}
        for key, alert in live.items():
            saved = self._saved.get(key)
            if saved is not None and continues(alert.spec, saved):
                restored.setdefault(alert.spec.stream, []).append(alert)
        for stream, alerts in restored.items():
            counts: dict[str, dict[str, _StagedCount]] = {alert.spec.key: {} for alert in alerts}
            plan = _stream_plan(alerts)
            stems: set[str] = set()
            for stem, table in self.store.staged(stream):
                stems.add(stem)
                for result in plan.evaluate(from_table(table)):
                    if result.error is None and (result.matched or result.excepted):
                        counts[result.key][stem] = _StagedCount(result.count, result.excepted)
            for alert in alerts:
                key, saved = alert.spec.key, self._saved[alert.spec.key]
                matches = sum(c.matches for c in counts[key].values())
                delta = matches - _saved_sum(saved, "stagedMatches", stems)
                if delta:
                    logger.info("alert %s: %+d matches recounted from the staging log", key, delta)
                    alert.tracker.total += delta
                    self._dirty = True
                if "stagedExcepted" in saved:  # a state saved before they were kept: as saved
                    excepted = sum(c.excepted for c in counts[key].values())
                    delta = excepted - _saved_sum(saved, "stagedExcepted", stems)
                    alert.tracker.excepted += delta
                    self._dirty = self._dirty or bool(delta)
                self._staged[key] = counts[key]

    def _live_alert(self, key: str, spec: AlertSpec) -> _LiveAlert:
        current = self._alerts.get(key)
        if current is not None and current.spec == spec:
            return current
        kind = _tracker_type(spec)
        tracker: Tracker
        if current is not None:
            tracker = kind.restore(spec, current.tracker.snapshot())
        elif key in self._saved:
            try:
                tracker = kind.restore(spec, self._saved[key])
            except SnapshotError as error:
                logger.warning("alert %s: saved state ignored: %s", key, error)
                tracker = kind(spec)
        else:
            tracker = kind(spec)
        self._dirty = True
        return _LiveAlert(spec, tracker)

    def _plan(self, stream: str, alerts: tuple[_LiveAlert, ...]) -> StreamPlan:
        """The stream's plan: the one in force while its alerts are the same, else a new one."""
        if self._by_stream.get(stream) == alerts:
            return self._plans[stream]
        return _stream_plan(alerts)

    def stream(self, name: str) -> StreamSpec | None:
        return self._streams.get(name)

    # -- ingest -----------------------------------------------------------------------------

    async def ingest(self, stream: StreamSpec, batch: EventBatch) -> dict[str, int]:
        """Keep a batch durably and run the stream's alerts on the events not seen before.

        Raises StorageUnavailable when nothing could be kept. Returns counts for the answer.
        """
        now = self.clock()
        alerts = self._by_stream.get(stream.name, ())
        done = asyncio.get_running_loop().create_future()
        self._ingests.add(done)
        try:
            return await self._ingest(stream, batch, alerts, now)
        finally:
            self._ingests.discard(done)
            done.set_result(None)

    async def _ingest(
        self,
        stream: StreamSpec,
        batch: EventBatch,
        alerts: tuple[_LiveAlert, ...],
        now: datetime,
    ) -> dict[str, int]:
        plan = self._plans.get(stream.name)
        stored, matches = await asyncio.to_thread(
            self._store_and_match, stream.name, batch, alerts, plan
        )
        received = len(batch)
        self.metrics.events_received.labels(stream.name).inc(received)
        self.metrics.events_stored.labels(stream.name).inc(stored)
        self.metrics.events_duplicate.labels(stream.name).inc(received - stored)
        notified = False
        for match in matches:
            key = match.alert.spec.key
            self.metrics.rule_matches.labels(key).inc(match.count)
            if match.excepted:
                self.metrics.rule_excepted.labels(key).inc(match.excepted)
            if self._alerts.get(key) is not match.alert:  # deleted meanwhile
                continue
            match.alert.tracker.excepted += match.excepted
            if match.segment is not None:
                per_segment = self._staged.setdefault(key, {})
                before = per_segment.get(match.segment, _StagedCount(0, 0))
                per_segment[match.segment] = _StagedCount(
                    before.matches + match.count, before.excepted + match.excepted
                )
            if match.latest is not None:
                notices = self._observe(match, now)
                self._deliver(match.alert.spec, notices)
                notified = notified or bool(notices)
        if matches:
            self._dirty = True
        if notified:
            # A state change: saved at once, and its deadlines (repeat, resolve) planned. Counts
            # alone wait for the next tick (MAX_TICK): saving them per request cost an fsync each.
            self._wake()
        return {"received": received, "stored": stored, "duplicates": received - stored}

    def _observe(self, match: _Matched, now: datetime) -> list[Notice]:
        """One request's matches fed to the alert's tracker; groups dropped are counted."""
        tracker = match.alert.tracker
        if isinstance(tracker, AlertTracker):
            assert match.latest is not None  # the caller observes only batches with a match
            return tracker.observe(match.count, match.latest, now)
        assert match.groups is not None and match.event is not None
        evicted = tracker.evicted
        notices = tracker.observe_groups(match.groups, match.event, now)
        if tracker.evicted > evicted:
            self.metrics.groups_evicted.labels(match.alert.spec.key).inc(tracker.evicted - evicted)
        return notices

    def _store_and_match(
        self,
        stream: str,
        batch: EventBatch,
        alerts: tuple[_LiveAlert, ...],
        plan: StreamPlan | None,
    ) -> tuple[int, list[_Matched]]:
        """Disk and rule work of one request, run in a worker thread.

        All the stream's alerts are evaluated in one pass of its plan. Per alert only the number
        of matches and the last matching event are taken: that is all a tracker needs, and it
        spares decoding the JSON of every matching event.
        """
        new = self.store.append(stream, batch)
        matches = []
        if len(new) and plan is not None:
            try:
                results = plan.evaluate(new)
            except Exception:  # the events are kept: a rule bug must not fail the request
                logger.exception("stream %s: rule evaluation failed", stream)
                results = []
            for result in results:
                alert = alerts[result.alert]
                if result.error is not None:  # this alert alone: the others are evaluated
                    logger.error(
                        "alert %s: rule evaluation failed",
                        alert.spec.key,
                        exc_info=result.error,
                    )
                elif result.matched or result.excepted:
                    # the last match parsed here, off the loop
                    last = result.last_row
                    latest = None if last is None else new.event(last)
                    matches.append(
                        _Matched(
                            alert,
                            result.count,
                            latest,
                            new.segment,
                            result.excepted,
                            result.groups,
                            new.event,
                        )
                    )
        return len(new), matches

    # -- time -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Repeats, resolves, Parquet flushes, retention and state saves, until `stop` is set."""
        self._wakeup = wakeup = asyncio.Event()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                wakeup.clear()  # before the work: a wake-up arriving during it is kept
                now = self.clock()
                await self._duty("alert_timers", self._tick_alerts, now)
                await self._housekeeping(now)
                waking = asyncio.ensure_future(wakeup.wait())
                await asyncio.wait(
                    {waking, stopping},
                    timeout=self._sleep_seconds(now),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waking.cancel()
        finally:
            stopping.cancel()

    def _tick_alerts(self, now: datetime) -> None:
        """Repeats and resolves now due."""
        for alert in list(self._alerts.values()):
            notices = alert.tracker.tick(now)
            if notices:
                self._dirty = True
                self._deliver(alert.spec, notices)

    async def _housekeeping(self, now: datetime) -> None:
        """Each duty on its own: one failing (a full disk, a bad value) is counted, logged and
        retried next tick, and never keeps the others from running."""
        if self.store.write_failure() is not None:
            await self._duty("storage_probe", asyncio.to_thread, self.store.probe)
        saved = await self._duty("state_save", self._save_state_if_dirty)
        if self.config_loaded and saved:  # before the first config, staged matches not recounted
            await self._duty("flush", self._flush_counted, now)
        if now - self._last_retention >= RETENTION_EVERY and await self._duty(
            "retention", asyncio.to_thread, self._apply_retention, now
        ):
            self._last_retention = now

    async def _save_state_if_dirty(self) -> None:
        if self._dirty:
            self._dirty = False
            state = self._state_snapshot()
            try:
                await asyncio.to_thread(self._write_state, state)
            except BaseException:
                self._dirty = True
                raise

    async def _flush_counted(self, now: datetime) -> None:
        """Convert the segments due, once every match in them is counted and saved: the
        ingests that may have written to them finish, then the state is saved."""
        sealed = await asyncio.to_thread(self.store.seal, now)
        if not sealed:
            return
        if in_progress := set(self._ingests):
            await asyncio.wait(in_progress)
        await self._save_state_if_dirty()
        try:
            await asyncio.to_thread(self.store.flush, now, segments=sealed)
        finally:
            converted = sealed - self.store.staged_segments()
            for counts in self._staged.values():
                for stem in converted & counts.keys():
                    del counts[stem]
                    self._dirty = True

    def _apply_retention(self, now: datetime) -> None:
        for name, spec in list(self._streams.items()):
            if spec.retention is not None:
                self.store.apply_retention(name, spec.retention, now)

    async def _duty(self, duty: str, work: Callable[..., Any], *args: Any) -> bool:
        """Run one background duty (`work(*args)`, awaited if it returns a coroutine);
        False, counted and logged, if it failed."""
        try:
            result = work(*args)
            if isinstance(result, Coroutine):
                await result
        except Exception:
            self.metrics.background_failures.labels(duty).inc()
            logger.exception("background duty %s failed; retried at the next tick", duty)
            return False
        return True

    def _sleep_seconds(self, now: datetime) -> float:
        deadlines = [now + MAX_TICK]
        deadlines += [
            deadline
            for alert in self._alerts.values()
            if (deadline := alert.tracker.next_deadline()) is not None
        ]
        return max(0.0, (min(deadlines) - now).total_seconds())

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _deliver(self, spec: AlertSpec, notices: list[Notice]) -> None:
        if not notices:
            return
        task = asyncio.get_running_loop().create_task(self._deliver_counted(spec, notices))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver_counted(self, spec: AlertSpec, notices: list[Notice]) -> None:
        results = await asyncio.gather(
            *(self.notifier.deliver(spec, n) for n in notices), return_exceptions=True
        )
        for notice, ok in zip(notices, results, strict=True):
            if isinstance(ok, BaseException):  # a bug in delivery: the notice counts as failed
                self.metrics.background_failures.labels("delivery").inc()
                logger.error(
                    "alert %s: delivery to %s failed: %s",
                    spec.key,
                    notice.target,
                    type(ok).__name__,
                    exc_info=ok,
                )
            sent = ok is True
            counter = self.metrics.notifications_sent if sent else self.metrics.notifications_failed
            counter.labels(spec.key, notice.target).inc()

    async def close(self, timeout: float = 10.0) -> None:
        """Finish deliveries in flight (up to `timeout`), save state, flush storage."""
        if self._deliveries:
            _, late = await asyncio.wait(set(self._deliveries), timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._duty("state_save", self._save_state)  # storage is flushed whatever it did
        await asyncio.to_thread(self.store.close)
        await self.notifier.close()

    # -- persistence ------------------------------------------------------------------------

    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            saved = exactjson.loads(self._state_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as error:
            logger.warning("alert state in %s ignored: %s", self._state_path, error)
            return {}
        return saved if isinstance(saved, dict) else {}

    def _save_state(self) -> None:
        self._write_state(self._state_snapshot())

    def _state_snapshot(self) -> dict[str, dict[str, Any]]:
        """Every tracker's snapshot and its counts per staged segment (in the event loop's
        thread: ingests change both)."""
        self._saved.update(
            {
                key: alert.tracker.snapshot()
                | {
                    "stagedMatches": {stem: c.matches for stem, c in staged.items()},
                    "stagedExcepted": {stem: c.excepted for stem, c in staged.items()},
                }
                for key, alert in self._alerts.items()
                for staged in [self._staged.get(key, {})]
            }
        )
        return dict(self._saved)

    def _write_state(self, state: dict[str, dict[str, Any]]) -> None:
        """Write the state atomically (temp file, fsync, rename)."""
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._state_path.with_suffix(".tmp")
        with open(temporary, "wb") as file:
            file.write(orjson.dumps(state))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._state_path)

    # -- reporting --------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Ready once a configuration is loaded and the data directory takes writes (not
        while appends or flushes fail: see Store.write_failure)."""
        if not self.config_loaded:
            return False, "configuration not loaded yet"
        if not os.access(self.data_dir, os.W_OK):
            return False, f"data directory {self.data_dir} is not writable"
        failure = self.store.write_failure()
        if failure is not None:
            return False, f"storage writes fail: {failure}"
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """Every stream and alert with the fields of its custom resource's status."""
        now = self.clock()
        failure = self.store.write_failure()
        streams = {
            name: stream_status(spec, self.store.stats(name), self._conditions, now, failure)
            for name, spec in sorted(self._streams.items())
        }
        alerts: dict[str, Any] = {}
        for key, alert in sorted(self._alerts.items()):
            alerts[key] = alert_status(
                alert.spec.namespace,
                alert.spec.name,
                alert.spec.stream,
                alert.spec.generation,
                alert.tracker.status(),
                self.notifier.status(key),
                None,
                self._conditions,
                now,
            )
        for key, bad in sorted(self._invalid.items()):
            alerts[key] = alert_status(
                bad.namespace,
                bad.name,
                bad.stream,
                bad.generation,
                kept_status(self._saved.get(key)),
                self.notifier.status(key),
                ConfigError(bad.reason, bad.message),
                self._conditions,
                now,
            )
        for key, entry in [*streams.items(), *alerts.items()]:
            entry["since"] = iso(self._since.get(key))
        return {"streams": streams, "alerts": alerts, "problems": self._problems}
