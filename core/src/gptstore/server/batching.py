"""Dynamic batching: one worker thread per deployment feeds its runner from a bounded queue.

Requests that arrive while the runner is busy wait in the queue; when it is free, the worker takes
as many of them as fit in ``max_batch`` rows and decodes them as one batch (left-padded, each row
with its own sampling settings and seed). A full queue refuses at once with :class:`Overloaded`
(HTTP 429 with Retry-After) instead of letting latency grow without bound.

Batching is static: a batch runs until its longest row is done, and newcomers wait for the next
one. Rows decoded in one batch can differ in the last bits of their logits from the same rows
decoded alone (padding changes the shapes of the matrix products), as in any batching server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence

from attrs import define, frozen

from gptstore.errors import GptstoreError
from gptstore.protocols import Runner
from gptstore.types import Generation, GenerationRequest

log = logging.getLogger("gptstore.server")


class Overloaded(GptstoreError):
    """A deployment's queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, deployment: str, waiting: int, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"deployment {deployment!r} is busy: {waiting} requests are waiting (its max_queue); "
            f"retry after {retry_after} s"
        )


@frozen
class _Job:
    requests: tuple[GenerationRequest, ...]
    done: Callable[[list[Generation] | Exception], None]


@define
class BatchStats:
    """What the worker has done: ``rows / batches`` is the mean batch size."""

    batches: int = 0
    rows: int = 0
    largest: int = 0


def _settle(future: asyncio.Future[list[Generation]], result: list[Generation] | Exception) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class Batcher:
    """Feeds ``runner.generate`` from a queue of at most ``max_queue`` waiting requests, in
    batches of up to ``max_batch`` rows (a request with more rows than that runs alone)."""

    def __init__(self, runner: Runner, name: str, *, max_batch: int, max_queue: int) -> None:
        self.runner = runner
        self.name = name
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._closed = False
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The generations of ``requests``, decoded in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Generation]] = loop.create_future()

        def done(result: list[Generation] | Exception) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        self.submit(requests, done)
        return await future

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        done: Callable[[list[Generation] | Exception], None],
    ) -> None:
        """Queue ``requests``; ``done`` is called from the worker thread with the generations or
        the error. Raises :class:`Overloaded` when the queue is full."""
        if self._closed:
            raise GptstoreError(f"deployment {self.name!r} is being deleted")
        try:
            self._queue.put_nowait(_Job(tuple(requests), done))
        except queue.Full:
            raise Overloaded(self.name, self.max_queue) from None

    def close(self, timeout: float = 60) -> None:
        """Refuse new requests, answer the ones already queued, then stop the worker."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        carried: deque[_Job] = deque()  # taken from the queue, did not fit the last batch
        stopping = False  # close() queued its sentinel; what was queued before it still runs
        while carried or not stopping:
            job = carried.popleft() if carried else self._queue.get()
            if job is None:
                stopping = True
                continue
            jobs, rows = [job], len(job.requests)
            while rows < self.max_batch and not stopping:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                elif rows + len(more.requests) > self.max_batch:
                    carried.append(more)  # first in the next batch
                    break
                else:
                    jobs.append(more)
                    rows += len(more.requests)
            self._run(jobs)
        gone = GptstoreError(f"deployment {self.name!r} was deleted before this request ran")
        while True:  # submitted in the instant close() began
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.done(gone)

    def _run(self, jobs: list[_Job]) -> None:
        batch = [r for job in jobs for r in job.requests]
        try:
            generations = self.runner.generate(batch)
        except Exception as exc:
            if len(jobs) > 1:  # one bad request fails only itself
                for job in jobs:
                    self._run([job])
                return
            if not isinstance(exc, GptstoreError):
                log.exception("deployment %s failed to generate", self.name)
            jobs[0].done(exc)
            return
        stats = self.stats
        stats.batches += 1
        stats.rows += len(batch)
        stats.largest = max(stats.largest, len(batch))
        start = 0
        for job in jobs:
            job.done(generations[start : start + len(job.requests)])
            start += len(job.requests)
