"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does it.

Only the holder of the Lease reconciles (runs kopf, writes status, posts Events, notifies). The
Lease counts as expired when its record has not changed for leaseDurationSeconds *as observed
locally* (so clocks of different nodes need not agree). A holder that cannot renew for
`renew_deadline` seconds gives up before anybody else may take over; a holder that stops cleanly
releases the Lease so a successor takes over at once.

The holder also advertises where its receiver listens (the annotation RECEIVER_ANNOTATION), and
the others, which read the Lease while they wait for it, learn from it where to forward ingest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from auditwatch.kube.aio import pause
from auditwatch.kube.api import ApiError, KubeApi

logger = logging.getLogger(__name__)

MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
RECEIVER_ANNOTATION = "auditwatch.dev/receiver"
"""On the Lease: the holder's receiver URL, where the other replicas forward ingest requests."""


@dataclass(frozen=True)
class LeaseSettings:
    """Which Lease, who we are, and the timing (client-go's defaults: 15 s, 10 s, 2 s)."""

    namespace: str
    identity: str
    name: str = "auditwatch"
    duration: float = 15.0
    """How long a Lease not renewed keeps others away."""
    renew_deadline: float = 10.0
    """How long the holder keeps trying to renew before it gives up leadership."""
    retry_period: float = 2.0
    """Pause between attempts to acquire, and between renewals."""
    receiver_url: str | None = None
    """Where this replica's receiver listens, advertised on the Lease while it holds it."""


def micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(MICRO_TIME)


class LeaderElection:
    """Acquire, keep and release one Lease."""

    def __init__(
        self,
        api: KubeApi,
        settings: LeaseSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.settings = settings
        self._monotonic = monotonic
        self._observed: tuple[Any, float] | None = None
        """The other holder's record last seen, and when it was first seen so."""
        self.is_leader = False
        self.leader_url: str | None = None
        """The receiver URL another live holder advertises (None while we hold the Lease, or
        nobody holds it, or the holder does not advertise)."""

    @property
    def _path(self) -> str:
        s = self.settings
        return f"/apis/coordination.k8s.io/v1/namespaces/{s.namespace}/leases/{s.name}"

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stop` is set (False)."""
        logged = False
        while not stop.is_set():
            if await self._attempt(self.settings.renew_deadline):
                logger.info(
                    "leader Lease %s acquired by %s", self.settings.name, self.settings.identity
                )
                return True
            if not logged:
                logger.info(
                    "standby: another replica holds the leader Lease %s", self.settings.name
                )
                logged = True
            await pause(stop, self.settings.retry_period)
        return False

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until `stop` (returns) or until leadership is lost (returns too; check
        `is_leader`).

        As client-go: errors (the apiserver unreachable, 5xx) are retried every retry period,
        and leadership is kept through them, for nobody else can take the Lease before it
        expires; only once `renew_deadline` passed without a renewal (each attempt is cut off
        at the deadline) does the holder step down. Another replica holding the Lease ends it
        at once.
        """
        s = self.settings
        last_renewed = self._monotonic()
        while not stop.is_set():
            if await pause(stop, s.retry_period):
                return
            renewed = await self._attempt(s.renew_deadline - (self._monotonic() - last_renewed))
            if renewed:
                last_renewed = self._monotonic()
            elif not self.is_leader:
                logger.warning("leader Lease %s is held by another replica: stepping down", s.name)
                return
            elif self._monotonic() - last_renewed >= s.renew_deadline:
                self.is_leader = False
                logger.error(
                    "leader Lease %s not renewed for %.0f s: stepping down",
                    s.name,
                    s.renew_deadline,
                )
                return

    async def release(self) -> None:
        """Hand the Lease back (holder cleared), so a standby replica need not wait it out."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            lease = await self.api.request("GET", self._path)
            if lease.get("spec", {}).get("holderIdentity") != self.settings.identity:
                return
            metadata = lease.setdefault("metadata", {})
            annotations = metadata.get("annotations") or {}
            annotations.pop(RECEIVER_ANNOTATION, None)
            metadata["annotations"] = annotations
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "renewTime": micro_time(datetime.now(UTC)),
            }
            await self.api.request("PUT", self._path, lease)
            logger.info("leader Lease %s released", self.settings.name)
        except ApiError as error:
            logger.warning("leader Lease %s not released: %s", self.settings.name, error)

    async def _attempt(self, seconds: float) -> bool:
        """One try to acquire or renew, given up after `seconds` (a connection that hangs must
        not outlast the renew deadline, nor keep a standby from retrying)."""
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                return await self._try_acquire_or_renew()
        except TimeoutError:
            logger.warning("leader Lease %s: no answer within %.1f s", self.settings.name, seconds)
            return False

    async def _try_acquire_or_renew(self) -> bool:
        try:
            held = await self._acquire_or_renew()
        except ApiError as error:
            logger.warning("leader Lease %s: %s", self.settings.name, error)
            return False
        if not held and self.is_leader:
            self.is_leader = False
        if held:
            self.is_leader = True
        return held

    async def _acquire_or_renew(self) -> bool:
        s = self.settings
        now = micro_time(datetime.now(UTC))
        ours = {
            "holderIdentity": s.identity,
            "leaseDurationSeconds": max(1, round(s.duration)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        advertised = {RECEIVER_ANNOTATION: s.receiver_url} if s.receiver_url else {}
        try:
            lease = await self.api.request("GET", self._path)
        except ApiError as error:
            if error.status != 404:
                raise
            self.leader_url = None
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": s.name, "namespace": s.namespace, "annotations": advertised},
                "spec": ours,
            }
            try:
                await self.api.request(
                    "POST", f"/apis/coordination.k8s.io/v1/namespaces/{s.namespace}/leases", body
                )
            except ApiError as conflict:
                if conflict.status == 409:
                    return False  # another replica created it first
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        metadata = lease.setdefault("metadata", {})
        annotations = metadata.get("annotations") or {}
        if holder and holder != s.identity and not self._expired(spec):
            self.leader_url = annotations.get(RECEIVER_ANNOTATION) or None
            return False
        self.leader_url = None
        # Ours, or none: never a former holder's.
        others = {k: v for k, v in annotations.items() if k != RECEIVER_ANNOTATION}
        metadata["annotations"] = {**others, **advertised}
        if holder == s.identity:
            ours["acquireTime"] = spec.get("acquireTime") or now
            ours["leaseTransitions"] = spec.get("leaseTransitions") or 0
        else:
            ours["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = {**spec, **ours}
        try:
            await self.api.request("PUT", self._path, lease)
        except ApiError as error:
            if error.status == 409:
                return False  # changed meanwhile: somebody renewed or took it
            raise
        self._observed = None
        return True

    def _expired(self, spec: dict[str, Any]) -> bool:
        """True once the holder's record stayed the same for its leaseDurationSeconds."""
        record = (spec.get("holderIdentity"), spec.get("renewTime"))
        now = self._monotonic()
        if self._observed is None or self._observed[0] != record:
            self._observed = (record, now)
        duration = spec.get("leaseDurationSeconds") or self.settings.duration
        return now - self._observed[1] >= float(duration)
