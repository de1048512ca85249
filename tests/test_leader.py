"""Leader election's timing as client-go's: transient errors are ridden out until the renew
deadline, another holder ends leadership at once. Loop time is fast-forwarded (looptime)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from auditwatch.kube.api import ApiError
from auditwatch.kube.leader import LeaderElection, LeaseSettings

pytestmark = pytest.mark.looptime


class LeaseApi:
    """One Lease in memory; answers with errors while `down` is set, as an unreachable
    apiserver does."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.down = False
        self.calls = 0

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.down:
            raise ApiError(0, f"{method} {path}: connection refused")
        if method == "GET":
            if self.lease is None:
                raise ApiError(404, "not found")
            return copy.deepcopy(self.lease)
        self.lease = copy.deepcopy(body)
        return body


def election(api: LeaseApi) -> LeaderElection:
    settings = LeaseSettings(namespace="auditwatch", identity="me")  # 15 s, 10 s, 2 s
    loop = asyncio.get_running_loop()
    return LeaderElection(api, settings, monotonic=loop.time)  # type: ignore[arg-type]


async def lead(api: LeaseApi) -> tuple[LeaderElection, asyncio.Event, asyncio.Task[None]]:
    leader = election(api)
    stop = asyncio.Event()
    assert await leader.acquire(stop) and leader.is_leader
    return leader, stop, asyncio.create_task(leader.keep(stop))


async def test_an_outage_shorter_than_the_renew_deadline_keeps_the_leader() -> None:
    api = LeaseApi()
    leader, stop, keeping = await lead(api)
    await asyncio.sleep(3)
    api.down = True
    # 7 s: within the renew deadline (10 s) of the last renewal, retried every 2 s.
    await asyncio.sleep(7)
    assert not keeping.done() and leader.is_leader
    api.down = False
    await asyncio.sleep(3)
    assert not keeping.done() and leader.is_leader
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "me"
    stop.set()
    await keeping


async def test_the_leader_steps_down_once_the_renew_deadline_passes_without_a_renewal() -> None:
    api = LeaseApi()
    leader, _stop, keeping = await lead(api)
    await asyncio.sleep(1)
    api.down = True
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(keeping, 30)
    lasted = asyncio.get_running_loop().time() - started
    assert not leader.is_leader
    assert 9 <= lasted <= 12.5, lasted  # at the deadline (10 s after the last renewal)


async def test_the_leader_steps_down_at_once_when_another_replica_holds_the_lease() -> None:
    api = LeaseApi()
    leader, _stop, keeping = await lead(api)
    assert api.lease is not None
    api.lease["spec"]["holderIdentity"] = "other"
    api.lease["spec"]["renewTime"] = "2099-01-01T00:00:00.000000Z"
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(keeping, 30)
    assert not leader.is_leader
    assert asyncio.get_running_loop().time() - started <= 2.5  # the next renewal


async def test_a_renewal_that_hangs_is_cut_off_at_the_deadline() -> None:
    api = LeaseApi()
    leader, _stop, keeping = await lead(api)
    hang = asyncio.Event()

    async def hanging(method: str, path: str, body: Any = None) -> Any:
        await hang.wait()  # never answers (a black-holed connection)

    api.request = hanging  # type: ignore[method-assign]
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(keeping, 60)
    assert not leader.is_leader
    assert asyncio.get_running_loop().time() - started <= 12.5
