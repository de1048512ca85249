"""workers.py: jobs run in worker processes, answers and failures come back, dead workers are
replaced, and at most `size` jobs run at once."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from auditwatch.workers import JobFailed, WorkerDied, WorkerPool


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot cross a process boundary")
        self.handle = lambda: None


def job(body: bytes, arguments: Any) -> Any:
    """What the tests ask a worker to do, by the body's first word."""
    command, _, rest = body.partition(b" ")
    if command == b"echo":
        return os.getpid(), len(rest), arguments
    if command == b"fail":
        raise ValueError(rest.decode())
    if command == b"unpicklable":
        raise Unpicklable
    if command == b"die":
        os._exit(3)
    if command == b"reverse":
        return rest[::-1]
    if command == b"sleep":
        started = time.time()
        time.sleep(float(rest))
        return os.getpid(), started, time.time()
    raise AssertionError(f"unknown command {command!r}")


@pytest.fixture
async def pool() -> Any:
    workers = WorkerPool(1, job)
    yield workers
    workers.close()


async def test_a_job_runs_in_another_process_with_its_body_and_arguments(pool: WorkerPool) -> None:
    body = b"echo " + os.urandom(5 * 1024 * 1024)  # bigger than any socket buffer
    pid, size, arguments = await pool.run(body, {"limit": 10, "stream": "s"})
    assert pid != os.getpid()
    assert size == 5 * 1024 * 1024
    assert arguments == {"limit": 10, "stream": "s"}


async def test_a_buffer_result_comes_back_as_its_bytes(pool: WorkerPool) -> None:
    """Sent as it is rather than pickled (the receiver's batches are a few hundred KiB)."""
    data = os.urandom(3 * 1024 * 1024)
    answer = await pool.run(b"reverse " + data, None)
    assert isinstance(answer, bytearray) and answer == data[::-1]


async def test_a_jobs_exception_reaches_the_caller_and_the_worker_goes_on(pool: WorkerPool) -> None:
    pid, _, _ = await pool.run(b"echo", None)
    with pytest.raises(ValueError, match="bad body"):
        await pool.run(b"fail bad body", None)
    assert (await pool.run(b"echo", None))[0] == pid


async def test_an_exception_that_does_not_pickle_arrives_as_its_traceback(
    pool: WorkerPool,
) -> None:
    with pytest.raises(JobFailed, match="Unpicklable"):
        await pool.run(b"unpicklable", None)
    assert (await pool.run(b"echo x", None))[1] == 1


async def test_a_worker_that_dies_is_replaced(pool: WorkerPool) -> None:
    pid, _, _ = await pool.run(b"echo", None)
    with pytest.raises(WorkerDied):
        await pool.run(b"die", None)
    new_pid, _, _ = await pool.run(b"echo", None)
    assert new_pid != pid


async def test_a_cancelled_job_does_not_wedge_the_pool(pool: WorkerPool) -> None:
    slow = asyncio.ensure_future(pool.run(b"sleep 30", None))
    await asyncio.sleep(0.5)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    answer = await asyncio.wait_for(pool.run(b"echo ok", None), timeout=20)
    assert answer[1] == 2


async def test_one_worker_runs_one_job_at_a_time(pool: WorkerPool) -> None:
    first, second = await asyncio.gather(pool.run(b"sleep 0.3", 1), pool.run(b"sleep 0.3", 2))
    assert first[0] == second[0]
    assert first[2] <= second[1] or second[2] <= first[1]


async def test_jobs_run_side_by_side_in_as_many_workers() -> None:
    workers = WorkerPool(2, job)
    try:
        first, second = await asyncio.gather(
            workers.run(b"sleep 0.5", 1), workers.run(b"sleep 0.5", 2)
        )
    finally:
        workers.close()
    assert first[0] != second[0]
    assert first[1] < second[2] and second[1] < first[2]


async def test_close_stops_every_worker() -> None:
    workers = WorkerPool(2, job)
    await asyncio.gather(workers.run(b"sleep 0.1", 1), workers.run(b"sleep 0.1", 2))
    processes = [worker.process for worker in workers._workers]
    assert len(processes) == 2 and all(process.is_alive() for process in processes)
    workers.close()
    assert not any(process.is_alive() for process in processes)


def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one"):
        WorkerPool(0, job)
