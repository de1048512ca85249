"""Status of AuditStreams and AuditAlerts written back to the API, and Events about them.

One writer task for all resources, rather than a patch per match: every `interval` seconds (or
soon after a configuration change) it takes the engine's status, and patches through the /status
subresource only the resources whose status differs from what was last written. A burst of a
million matches therefore costs one patch per resource per interval. Events are posted on the
transitions a user cares about (Firing, Resolved, Invalid, valid again), after the status patch
that records the transition succeeded, so a restart never repeats one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from auditwatch.config.model import StreamSpec
from auditwatch.engine import Engine, utcnow
from auditwatch.kube.aio import pause
from auditwatch.kube.api import GROUP, VERSION, ApiError, KubeApi
from auditwatch.kube.source import KubeSource, resource_key
from auditwatch.status import Conditions, iso, stream_status

logger = logging.getLogger(__name__)

API_STATUS_ONLY_KEYS = ("namespace", "name", "stream", "since", "keptState")
"""Keys of /api/v1/status entries that the custom resources' status schema does not have."""

KEPT_WHILE_INVALID = ("targets",)
"""Status fields an Invalid alert keeps as written when the engine has nothing to say of them
(delivery records live in memory only: after a restart they are known from the object alone)."""

EVENT_MESSAGE_LIMIT = 1024
CLUSTER_EVENTS_NAMESPACE = "default"
"""Where Events about cluster-scoped objects (AuditStreams) must go: the apiserver refuses (422)
an Event whose namespace differs from its involved object's, and for a cluster-scoped object
only `default` is accepted (as for Nodes and Namespaces)."""

COUNT_FIELDS = frozenset({"eventsReceived", "lastEventTime", "excepted"})
"""Status fields that only count (an AuditStream's events, an AuditAlert's excepted events): a
change of these alone is written at most every `counts_interval` (the first after a quiet spell
at once). A stream that receives the operator's own API calls (its status patches are audit
events too) would otherwise be patched every interval on an idle cluster, and so would an alert
whose exceptions silence a busy controller."""

Clock = Callable[[], datetime]
MIN_TIME = datetime.min.replace(tzinfo=UTC)


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    for condition in status.get("conditions") or []:
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            return condition
    return {}


class StatusWriter:
    """Keeps the resources' `.status` in step with the engine; posts Events on transitions."""

    def __init__(
        self,
        api: KubeApi,
        source: KubeSource,
        engine: Engine,
        *,
        reporter: str,
        interval: float = 2.0,
        counts_interval: float = 30.0,
        clock: Clock = utcnow,
    ) -> None:
        self.api = api
        self.source = source
        self.cache = source.cache
        self.engine = engine
        self.reporter = reporter
        self.interval = interval
        self.clock = clock
        self._written: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        """(kind, key) -> (uid, status) as last patched by this process."""
        self._wakeup = asyncio.Event()
        self.counts_interval = timedelta(seconds=counts_interval)
        self._counted: dict[tuple[str, str], datetime] = {}
        """(kind, key) -> when a patch of counts alone was last sent."""
        self._kept: dict[tuple[str, str], str] = {}
        """(kind, key) -> the state an Invalid alert keeps: back from Invalid it continues in
        it, which is no new firing (nor, if it was Resolved, a resolve)."""

    def poke(self) -> None:
        """Write soon (the configuration changed), still no more often than the interval."""
        self._wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write every interval (or after a poke) until `stop`, then once more."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            self._wakeup.clear()  # before the write: a poke arriving during it is kept
            await self._write_logged()
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wakeup.wait())}
            try:
                await asyncio.wait(waits, timeout=self.interval, return_when="FIRST_COMPLETED")
            finally:
                for waiting in waits:
                    waiting.cancel()
            # A poke shortens the wait, but writes stay at least a quarter interval apart.
            if not stop.is_set():
                await pause(stop, started + self.interval / 4 - loop.time())
        await self._write_logged()

    async def _write_logged(self) -> None:
        try:
            await self.write_once()
        except Exception:  # the next round tries again; the operator must keep running
            logger.exception("writing status failed")

    async def write_once(self) -> int:
        """Patch every resource whose status changed; the number of patches sent."""
        now = self.clock()
        engine_status = self.engine.status()
        config = self.source.config
        if config is None:
            return 0
        patched = 0
        for kind, key, body in list(self.cache.bodies()):
            observed = self.cache.observed.get((kind, key))
            if observed is None:
                continue
            if kind == "AuditStream":
                error = config.invalid_streams.get(key)
                if error is not None:
                    desired = self._invalid_stream_status(key, body, error.reason, error.message)
                else:
                    desired = engine_status["streams"].get(key)
            else:
                desired = engine_status["alerts"].get(key)
            if desired is None:
                continue  # not applied yet: the next round has it
            if desired.get("keptState"):
                self._kept[(kind, key)] = desired["keptState"]
            desired = _without_nulls(
                {k: v for k, v in desired.items() if k not in API_STATUS_ONLY_KEYS}
            )
            written = self._written.get((kind, key))
            previous = written[1] if written and written[0] == observed.uid else observed.status
            if desired.get("state") == "Invalid":
                kept = {k: previous[k] for k in KEPT_WHILE_INVALID if k in previous}
                desired = {**kept, **desired}
            desired = _keep_transition_time(previous, desired, now)
            patch = _merge_patch(previous, desired)
            if not patch:
                self._written[(kind, key)] = (observed.uid, desired)
                continue
            counts_only = set(patch) <= COUNT_FIELDS
            last_counted = self._counted.get((kind, key), MIN_TIME)
            if counts_only and now - last_counted < self.counts_interval:
                continue  # nothing but counts changed, and such a write was made a moment ago
            namespace = body["metadata"].get("namespace") if kind == "AuditAlert" else None
            name = body["metadata"]["name"]
            try:
                await self.api.patch_status(kind, namespace, name, patch)
            except ApiError as error:
                if error.status != 404:  # 404: deleted meanwhile, nothing to write
                    logger.warning("%s %s: status not written: %s", kind, key, error)
                continue
            patched += 1
            self._written[(kind, key)] = (observed.uid, desired)
            if counts_only:
                self._counted[(kind, key)] = now
            await self._post_transition_events(kind, body, observed.uid, previous, desired)
        live = {(kind, key) for kind, key, _ in self.cache.bodies()}
        self._written = {k: v for k, v in self._written.items() if k in live}
        self._kept = {k: v for k, v in self._kept.items() if k in live}
        self._counted = {k: v for k, v in self._counted.items() if k in live}
        return patched

    def _invalid_stream_status(
        self, name: str, body: dict[str, Any], reason: str, message: str
    ) -> dict[str, Any]:
        """Counts of what was received so far, and Ready=False with why it cannot receive."""
        generation = body["metadata"].get("generation", 1)
        stats = self.engine.store.stats(name)
        status = stream_status(
            StreamSpec(name=name, generation=generation), stats, Conditions(), self.clock()
        )
        status["conditions"] = Conditions().ready(
            f"stream/{name}", False, reason, message, generation, self.clock()
        )
        return status

    async def _post_transition_events(
        self,
        kind: str,
        body: dict[str, Any],
        uid: str,
        previous: dict[str, Any],
        current: dict[str, Any],
    ) -> None:
        was, now = ready_condition(previous), ready_condition(current)
        events: list[tuple[str, str, str]] = []
        if now.get("status") == "False" and (
            was.get("status") != "False" or was.get("message") != now.get("message")
        ):
            events.append(("Warning", str(now.get("reason")), str(now.get("message"))))
        elif now.get("status") == "True" and was.get("status") == "False":
            events.append(("Normal", "Valid", str(now.get("message"))))
        if kind == "AuditAlert":
            state, before = current.get("state"), previous.get("state")
            if before == "Invalid":  # back from Invalid: it continues in the state it kept
                before = self._kept.pop(resource_key(body), before)
            if state == "Firing" and before != "Firing":
                events.append(("Normal", "Firing", _firing_message(current)))
            elif state == "Resolved" and before == "Firing":
                events.append(
                    ("Normal", "Resolved", f"no more matches; {current.get('matches', 0)} in all")
                )
        for event_type, reason, message in events:
            await self._post_event(kind, body, uid, event_type, reason, message)

    async def _post_event(
        self, kind: str, body: dict[str, Any], uid: str, event_type: str, reason: str, message: str
    ) -> None:
        metadata = body["metadata"]
        involved = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "name": metadata["name"],
            "uid": uid,
        }
        namespace = CLUSTER_EVENTS_NAMESPACE
        if kind == "AuditAlert":
            namespace = involved["namespace"] = metadata.get("namespace") or "default"
        now = iso(self.clock())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "auditwatch-", "namespace": namespace},
            "involvedObject": involved,
            "type": event_type,
            "reason": reason,
            "message": message[:EVENT_MESSAGE_LIMIT],
            "source": {"component": "auditwatch"},
            "reportingComponent": "auditwatch.dev/operator",
            "reportingInstance": self.reporter,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.api.post_event(namespace, event)
        except ApiError as error:  # an Event is a courtesy: never fail the status for it
            logger.warning("%s %s: Event %s not posted: %s", kind, metadata["name"], reason, error)


def _firing_message(status: dict[str, Any]) -> str:
    last = status.get("lastMatch") or {}
    what = " ".join(
        str(part)
        for part in (
            last.get("user"),
            last.get("verb"),
            last.get("resource"),
            "/".join(p for p in (last.get("namespace"), last.get("name")) if p),
        )
        if part
    )
    message = f"{status.get('matches', 0)} matching event(s)"
    return f"{message}; last: {what}" if what else message


def _without_nulls(value: Any) -> Any:
    """Fields without a value left out: the schema types them (a null string is invalid), and
    in a merge-patch a null deletes."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _keep_transition_time(
    previous: dict[str, Any], desired: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """Ready's lastTransitionTime moves only when its status does, as written on the object
    (the engine's memory of transitions starts afresh with each process)."""
    was, ready = ready_condition(previous), ready_condition(desired)
    if not ready:
        return desired
    if was.get("status") == ready.get("status") and was.get("lastTransitionTime"):
        moment = was["lastTransitionTime"]
    elif was:
        moment = iso(now)
    else:
        return desired
    conditions = [
        {**condition, "lastTransitionTime": moment} if condition is ready else condition
        for condition in desired["conditions"]
    ]
    return {**desired, "conditions": conditions}


def _merge_patch(previous: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The merge-patch (RFC 7386) of `.status` from previous to desired: None deletes a field,
    also inside an object (a `lastMatch` without `namespace` must not keep the previous one)."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        was = previous.get(key)
        if was == value:
            continue
        if isinstance(value, dict) and isinstance(was, dict):
            patch[key] = _merge_patch(was, value)
        else:
            patch[key] = value
    patch.update({key: None for key in previous if key not in desired})
    return patch
