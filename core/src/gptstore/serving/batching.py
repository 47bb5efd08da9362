"""Dynamic batching: one worker thread per deployment feeds its runner from a bounded queue.

Requests that arrive while the runner is busy wait in the queue; when it is free, the worker takes
as many of them as fit in ``max_batch`` rows and decodes them as one batch (left-padded, each row
with its own sampling settings and seed). A full queue refuses at once with :class:`Overloaded`
(HTTP 429 with Retry-After) instead of letting latency grow without bound.

Streams go through the same queue and the same thread, one at a time and not batched: the worker
is the only thread that runs the model, so no request ever waits on a lock inside a shared thread
pool. A stream whose client has gone is stopped at its next token.

Batching is static: a batch runs until its longest row is done, and newcomers wait for the next
one. Rows decoded in one batch can differ in the last bits of their logits from the same rows
decoded alone (padding changes the shapes of the matrix products), as in any batching server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import attrs
from attrs import define, frozen

from gptstore.errors import GptstoreError, PluginError, Unavailable
from gptstore.protocols import Runner, StreamChunk
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
    """Requests decoded together, answered through ``done``."""

    requests: tuple[GenerationRequest, ...]
    done: Callable[[list[Generation] | Exception], None]
    wanted: Callable[[], bool] = lambda: True  # False once the client has gone


#: What a stream job pushes: a choice index and a chunk, an error, or None at the end.
StreamItem = tuple[int, StreamChunk] | Exception | None


@frozen
class _StreamJob:
    """Requests streamed one after another, chunk by chunk through ``push``."""

    requests: tuple[GenerationRequest, ...]
    push: Callable[[StreamItem], None]
    wanted: Callable[[], bool] = lambda: True


@define
class BatchStats:
    """What the worker has done: ``rows / batches`` is the mean batch size."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    streams: int = 0


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits any more
        loop.call_soon_threadsafe(callback, *args)


def _settle(future: asyncio.Future[list[Generation]], result: list[Generation] | Exception) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


class Batcher:
    """Feeds ``runner`` from a queue of at most ``max_queue`` waiting requests: generations in
    batches of up to ``max_batch`` rows (a larger request runs alone, ``max_batch`` rows at a
    time), streams one at a time."""

    def __init__(
        self, runner: Runner, name: str, *, max_batch: int, max_queue: int, backend: str = "?"
    ) -> None:
        self.runner = runner
        self.name = name
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._closed = False
        self._lock = threading.Lock()  # orders submissions against close()
        self._accepted = 0  # requests accepted and not answered yet (see _enqueue)
        self._queue: queue.Queue[_Job | _StreamJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        """Requests accepted and not answered yet (running or waiting)."""
        return self._accepted

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it stops only after :meth:`close`)."""
        return self._thread.is_alive()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The generations of ``requests``, decoded in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Generation]] = loop.create_future()

        def done(result: list[Generation] | Exception) -> None:
            _call_soon(loop, _settle, future, result)

        self._enqueue(_Job(tuple(requests), done, lambda: not future.done()))
        try:
            return await future
        finally:
            self._release()

    async def stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        """The chunks of each request in turn, with the request's index. Closing the iterator
        early (a client that disconnects) stops the decoding at its next token."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[StreamItem] = asyncio.Queue()
        gone = threading.Event()

        def push(item: StreamItem) -> None:
            _call_soon(loop, items.put_nowait, item)

        self._enqueue(_StreamJob(tuple(requests), push, lambda: not gone.is_set()))
        try:
            while True:
                item = await items.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            gone.set()
            self._release()

    def submit(
        self,
        requests: Sequence[GenerationRequest],
        done: Callable[[list[Generation] | Exception], None],
        *,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """Queue ``requests``; ``done`` is called once, from the worker thread, with the
        generations or the error (not at all when ``wanted()`` says the caller has gone).
        Raises :class:`Overloaded` when full and :class:`Unavailable` once :meth:`close` has
        begun."""
        settled = threading.Event()

        def release() -> None:
            if not settled.is_set():
                settled.set()
                self._release()

        def answer(result: list[Generation] | Exception) -> None:
            release()
            done(result)

        def still_wanted() -> bool:
            if wanted():
                return True
            release()
            return False

        self._enqueue(_Job(tuple(requests), answer, still_wanted))

    def _enqueue(self, job: _Job | _StreamJob) -> None:
        """Accept ``job`` when fewer than ``max_batch + max_queue`` requests are accepted and not
        answered (``max_batch`` may run, ``max_queue`` wait), counted here rather than by the
        worker, so a burst is refused exactly however the worker thread is scheduled."""
        with self._lock:
            if self._closed:
                raise Unavailable(f"deployment {self.name!r} is being deleted")
            if self._accepted >= self.max_batch + self.max_queue:
                raise Overloaded(self.name, self.max_queue)
            self._accepted += 1
            self._queue.put_nowait(job)

    def _release(self) -> None:
        """One accepted request is answered, or its client has gone."""
        with self._lock:
            self._accepted -= 1

    def close(self) -> None:
        """Refuse new requests, answer the ones already queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            self._queue.put(None)  # after every accepted job: they were queued under the lock
            self._thread.join()

    def _work(self) -> None:
        carried: deque[_Job | _StreamJob] = deque()  # taken from the queue, not run yet
        stopping = False  # close() queued its sentinel; what was queued before it still runs
        while carried or not stopping:
            job = carried.popleft() if carried else self._queue.get()
            if job is None:
                stopping = True
                continue
            if isinstance(job, _StreamJob):
                self._guarded(self._stream, job)
                continue
            jobs, rows = [job], len(job.requests)
            while rows < self.max_batch and not stopping:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                elif isinstance(more, _StreamJob) or rows + len(more.requests) > self.max_batch:
                    carried.append(more)  # first in line next time
                    break
                else:
                    jobs.append(more)
                    rows += len(more.requests)
            self._guarded(self._run, jobs)

    def _guarded(self, step: Callable[[Any], None], work: Any) -> None:
        """Run one step of the worker; an unexpected error fails that step's requests, never
        the worker (which would leave every later request waiting)."""
        try:
            step(work)
        except Exception:
            log.exception("deployment %s: the batch worker failed", self.name)
            error = PluginError(
                f"deployment {self.name!r} (backend {self.backend}) failed; see the server log"
            )
            for job in work if isinstance(work, list) else [work]:
                _answer(job.done if isinstance(job, _Job) else job.push, error)

    def _generate(self, batch: list[GenerationRequest]) -> list[Generation]:
        generations: list[Generation] = []
        for start in range(0, len(batch), self.max_batch):
            part = batch[start : start + self.max_batch]
            answers = self.runner.generate(part)
            if len(answers) != len(part):
                raise PluginError(
                    f"deployment {self.name!r}: backend {self.backend} answered {len(answers)} of "
                    f"{len(part)} requests"
                )
            if any(r.logprobs is not None and a.logprobs is None for r, a in zip(part, answers)):
                raise PluginError(
                    f"deployment {self.name!r}: backend {self.backend} declares "
                    "log-probabilities but returned none"
                )
            generations.extend(answers)
        return generations

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.wanted()]
        if not jobs:
            return
        batch = [r for job in jobs for r in job.requests]
        try:
            generations = self._generate(batch)
        except Exception as exc:
            if len(jobs) > 1:  # one bad request fails only itself
                for job in jobs:
                    self._run([job])
                return
            if not isinstance(exc, GptstoreError):
                log.exception("deployment %s failed to generate", self.name)
            _answer(jobs[0].done, exc)
            return
        stats = self.stats
        stats.batches += 1
        stats.rows += len(batch)
        stats.largest = max(stats.largest, len(batch))
        start = 0
        for job in jobs:
            _answer(job.done, generations[start : start + len(job.requests)])
            start += len(job.requests)

    def _stream(self, job: _StreamJob) -> None:
        self.stats.streams += 1
        try:
            for index, request in enumerate(job.requests):
                if not job.wanted():  # the client left while this stream waited
                    return
                chunks = self.runner.stream(request)
                texts = 0
                try:
                    for chunk in chunks:
                        if not job.wanted():
                            return
                        texts += bool(chunk.text)
                        if chunk.finish_reason is not None and chunk.completion_tokens is None:
                            # a runner that does not count: a chunk with text is about a token
                            count = getattr(self.runner, "count_tokens", None)
                            chunk = attrs.evolve(
                                chunk,
                                prompt_tokens=chunk.prompt_tokens
                                or (count(request.prompt) if count else None),
                                completion_tokens=texts,
                            )
                        job.push((index, chunk))
                finally:
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()  # a generator holding the runner's lock lets go of it
        except Exception as exc:
            if not isinstance(exc, GptstoreError):
                log.exception("deployment %s failed to stream", self.name)
            _answer(job.push, exc)
            return
        _answer(job.push, None)


def _answer(callback: Callable[[Any], None], value: Any) -> None:
    """Hand ``value`` to a waiting request; a failure here must not stop the worker, or every
    later request would wait forever."""
    try:
        callback(value)
    except Exception:
        log.exception("could not answer a request")
