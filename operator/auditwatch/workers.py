"""Worker processes that run one CPU-bound job at a time for the event loop, over socket pairs.

The receiver decodes request bodies in them: decoding holds the GIL, and in other processes it
uses the other cores and leaves this process's GIL to the event loop (and to kopf, which shares
it). concurrent.futures' ProcessPoolExecutor did this at a cost the event loop's process paid per
request: the body pickled into a pipe by a feeder thread, results read back by a manager thread,
two thread hand-offs. Here the event loop writes the body to the worker's socket itself and
reads the answer back, with no thread in between and no copy it can avoid.

Wire format. A request is two frames, each an 8-byte big-endian length and that many bytes: the
pickled arguments, then the body as it is. An answer is a kind byte and an 8-byte length, then
that many bytes: a result that is a buffer (bytes, a pyarrow Buffer) as it is (kind R), any other
result pickled (V), or the job's exception pickled (E).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import pickle
import socket
import struct
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

_LENGTH = struct.Struct("!Q")
_ANSWER = struct.Struct("!cQ")
_RAW, _VALUE, _ERROR = b"R", b"V", b"E"
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

Job = Callable[[bytes, Any], Any]
"""What a worker runs: `job(body, arguments)`. A result that is a buffer comes back as a
bytearray of its bytes; any other result (or exception) must pickle."""


class WorkerDied(Exception):
    """The worker running a job exited (killed, out of memory) before it answered."""


class JobFailed(Exception):
    """The job raised an exception that does not pickle; the message is its traceback."""


class _Worker:
    """One worker process and this process's end of its socket (non-blocking)."""

    def __init__(self, process: BaseProcess, sock: socket.socket) -> None:
        self.process = process
        self.sock = sock

    async def exchange(self, body: bytes, arguments: Any) -> tuple[bool, Any]:
        """Send a job, wait for the answer: (True, result) or (False, the exception)."""
        loop = asyncio.get_running_loop()
        header = pickle.dumps(arguments)
        try:
            await loop.sock_sendall(
                self.sock, _LENGTH.pack(len(header)) + header + _LENGTH.pack(len(body))
            )
            await loop.sock_sendall(self.sock, body)
            kind, size = _ANSWER.unpack(await self._receive(_ANSWER.size))
            payload = await self._receive(size)
        except ConnectionError as error:
            raise WorkerDied(f"worker process {self.process.pid} exited") from error
        if kind == _RAW:
            return True, payload
        value = pickle.loads(payload)
        return kind == _VALUE, value

    async def _receive(self, size: int) -> bytearray:
        """Exactly `size` bytes, received straight into the buffer returned."""
        loop = asyncio.get_running_loop()
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = await loop.sock_recv_into(self.sock, view[received:])
            if count == 0:
                raise ConnectionResetError("the worker closed its socket")
            received += count
        return buffer

    def stop(self, grace_seconds: float) -> None:
        """Shut the socket down (the worker reads its end and exits); kill it after the grace."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.process.join(timeout=grace_seconds)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class WorkerPool:
    """`size` worker processes (forkserver), started on first use; a dead one is replaced.

    `run` waits for an idle worker, so at most `size` jobs run at once.
    """

    def __init__(self, size: int, job: Job) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        self.job = job
        self._idle: asyncio.Queue[_Worker | None] | None = None
        """Idle workers, and None for each free place a worker is yet to be started in."""
        self._workers: list[_Worker] = []

    async def run(self, body: bytes, arguments: Any) -> Any:
        """`job(body, arguments)` in a worker: its result, or the exception it raised.

        Raises WorkerDied if the worker exited meanwhile; the next job gets a new one.
        """
        worker = await self._take()
        try:
            ok, result = await worker.exchange(body, arguments)
        except BaseException:  # died, or cut off half-way (a cancelled request): replace it
            self._discard(worker)
            raise
        if self._idle is not None and worker in self._workers:
            self._idle.put_nowait(worker)
        if not ok:
            raise result
        return result

    def close(self) -> None:
        """Stop every worker (each finishes its current job first, for a few seconds)."""
        workers, self._workers, self._idle = self._workers, [], None
        for worker in workers:
            worker.stop(grace_seconds=5)

    async def _take(self) -> _Worker:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                self._idle.put_nowait(None)
        idle = self._idle
        worker = await idle.get()
        if worker is None:
            try:
                worker = await self._start()
            except BaseException:
                idle.put_nowait(None)
                raise
            self._workers.append(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        """Kill a worker for good; its place goes to a new one, started when needed."""
        worker.stop(grace_seconds=0)
        if worker in self._workers:
            self._workers.remove(worker)
            if self._idle is not None:
                self._idle.put_nowait(None)

    async def _start(self) -> _Worker:
        ours, theirs = socket.socketpair()
        # Room for a whole body in the socket (as far as the system allows): the event loop
        # then hands it over in one write rather than over several turns.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        context = multiprocessing.get_context("forkserver")
        process = context.Process(
            target=_serve, args=(theirs, self.job), name="auditwatch-decoder", daemon=True
        )
        await asyncio.to_thread(process.start)
        theirs.close()
        ours.setblocking(False)
        return _Worker(process, ours)


def _serve(sock: socket.socket, job: Job) -> None:
    """A worker's loop: answer each request until the other end closes the socket."""
    gc.freeze()  # what start-up imported needs no more scans by the cycle collector
    with sock:
        while True:
            header = _receive_frame(sock)
            if header is None:
                return
            body = _receive_frame(sock)
            if body is None:
                return
            kind, answer = _answer(job, body, header)
            sock.sendall(_ANSWER.pack(kind, answer.nbytes))
            sock.sendall(answer)


def _answer(job: Job, body: bytes, header: bytes) -> tuple[bytes, memoryview]:
    """The kind and bytes of the answer to one request."""
    try:
        result = job(body, pickle.loads(header))
    except Exception as error:
        try:
            return _ERROR, memoryview(pickle.dumps(error))
        except Exception:
            return _ERROR, memoryview(pickle.dumps(JobFailed(traceback.format_exc())))
    try:
        return _RAW, memoryview(result).cast("B")
    except TypeError:
        return _VALUE, memoryview(pickle.dumps(result))


def _receive_frame(sock: socket.socket) -> bytes | None:
    """One frame's payload; None at the end of the stream (between frames or inside one)."""
    header = _receive_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (size,) = _LENGTH.unpack(header)
    return _receive_exactly(sock, size)


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, received straight into one bytes object (MSG_WAITALL) where possible."""
    data = sock.recv(size, socket.MSG_WAITALL)
    if len(data) == size:
        return data
    parts = [data]
    received = len(data)
    while received < size:  # interrupted by a signal, or the other end closed
        part = sock.recv(size - received)
        if not part:
            return None
        parts.append(part)
        received += len(part)
    return b"".join(parts)
