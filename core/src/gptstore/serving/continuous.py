"""Continuous batching: one running batch, decoded a step at a time, that requests join and leave.

The worker thread holds a running batch: every row's KV cache in one left-padded cache, its mask,
and the token each row feeds next. Each step, the running rows decode one token together; requests
that arrived meanwhile are prefilled together (their prompts left-padded among themselves) and
their cache joined to the batch's, padding whichever side is shorter; then every row picks its
next token with its own settings and seed (:func:`~gptstore.serving.decoding.pick`), and a row
that is done (end of sequence, stop sequence, max_tokens) or whose client has gone leaves the
batch at once: its cache rows are dropped, and padding that every remaining row has is trimmed.
Streams are rows like any other; their text goes out as it is decoded.

Bounds: at most ``max_batch`` rows run at once, and the rows' cache, each counted at its prompt
plus max_tokens padded to the longest, stays under ``kv_budget`` bytes (when the runner says how
many bytes a token takes). Requests wait their turn in order; one that can never fit in the budget
alone is refused. A row's output is the one it has decoded alone, up to the last bits of the
logits (padding changes the shapes of the matrix products), as with static batching.

Runners supply the cache surgery (:class:`~gptstore.serving.decoding.DecodingRunner`'s
``_cache_select`` and ``_cache_join``); other runners are batched statically
(:class:`~gptstore.serving.batching.Batcher`).
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Sequence
from typing import Any

from attrs import define

from gptstore.errors import GptstoreError, InvalidInput, PluginError
from gptstore.protocols import StreamChunk
from gptstore.serving.batching import Batcher, _answer, _Job, _StreamJob, log
from gptstore.serving.decoding import (
    DecodingRunner,
    Row,
    check_context,
    check_request,
    final_chunk,
    visible_text,
)
from gptstore.types import Generation
from gptstore.units import format_bytes


@define(eq=False)
class _Tally:
    """What a job's rows have produced, until the last is done."""

    job: _Job | _StreamJob
    results: list[Generation | None]
    left: int
    failed: bool = False


@define(eq=False)
class _Seat:
    """One request's row in the running batch."""

    row: Row
    ids: list[int]
    tally: _Tally
    index: int  # the request's place in its job
    token: int = 0  # what the row feeds next
    sent: str = ""  # streamed so far

    @property
    def reserved(self) -> int:
        """Tokens of cache the row may come to hold."""
        return self.row.prompt_tokens + self.row.request.max_tokens


@define(eq=False)
class _Running:
    seats: list[_Seat]
    mask: Any  # int64 [rows, cache positions]
    positions: Any  # int64 [rows]: each row's next position
    state: Any


class ContinuousBatcher(Batcher):
    """A :class:`Batcher` whose worker runs one batch continuously (see the module's text);
    ``kv_budget``: bytes of KV cache the running batch may hold (None: no bound but
    ``max_batch``)."""

    def __init__(
        self,
        runner: DecodingRunner,
        name: str,
        *,
        max_batch: int,
        max_queue: int,
        backend: str = "?",
        kv_budget: int | None = None,
    ) -> None:
        self.stepper = runner
        self.decoder = runner.decoder
        self.kv_budget = kv_budget
        self.kv_per_token = runner.kv_bytes_per_token() if kv_budget else None
        super().__init__(runner, name, max_batch=max_batch, max_queue=max_queue, backend=backend)

    # -- admission ----------------------------------------------------------------------------

    def _seats(self, job: _Job | _StreamJob) -> list[_Seat]:
        """A job's requests as seats, checked whole: a bad request fails its job alone."""
        tally = _Tally(job, [None] * len(job.requests), len(job.requests))
        if isinstance(job, _StreamJob):
            self.stats.streams += 1
        seats = []
        for index, request in enumerate(job.requests):
            check_request(request)
            ids = self.decoder.token_ids(request.prompt)
            check_context(len(ids), request.max_tokens, self.decoder.context_length)
            row = self.decoder.row(request, len(ids))
            seat = _Seat(row, ids, tally, index)
            if self.kv_per_token and self._kv_bytes(1, seat.reserved) > (self.kv_budget or 0):
                raise InvalidInput(
                    "request",
                    [
                        f"its prompt ({len(ids)} tokens) plus max_tokens {request.max_tokens} "
                        f"need {format_bytes(self._kv_bytes(1, seat.reserved))} of KV cache; "
                        f"deployment {self.name!r} has {format_bytes(self.kv_budget or 0)} "
                        "(kv_cache_mb); lower max_tokens or shorten the prompt"
                    ],
                )
            seats.append(seat)
        return seats

    def _fits(self, running: list[_Seat], seat: _Seat) -> bool:
        rows = [*running, seat]
        if len(rows) > self.max_batch:
            return False
        if not self.kv_per_token or len(rows) == 1:
            return True
        return self._kv_bytes(len(rows), max(s.reserved for s in rows)) <= (self.kv_budget or 0)

    def _kv_bytes(self, rows: int, length: int) -> int:
        """The cache ``rows`` rows hold once they reach ``length`` positions."""
        return rows * self.stepper.kv_positions(length) * (self.kv_per_token or 0)

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        running: _Running | None = None
        waiting: deque[_Seat] = deque()  # taken from the queue, not admitted yet
        stopping = False  # close() queued its sentinel: run what was accepted, then stop
        while True:
            seated = list(running.seats) if running is not None else []
            admitted: list[_Seat] = []
            while True:
                if waiting:
                    if waiting[0].tally.failed or not waiting[0].tally.job.wanted():
                        waiting.popleft()
                        continue
                    if not self._fits(seated, waiting[0]):
                        break
                    seat = waiting.popleft()
                    seated.append(seat)
                    admitted.append(seat)
                    continue
                if stopping:
                    break
                try:
                    job = self._queue.get(block=not seated)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                elif job.wanted():
                    try:
                        waiting.extend(self._seats(job))
                    except Exception as exc:
                        _answer(job.done if isinstance(job, _Job) else job.push, exc)
            if running is None and not admitted:
                if stopping and not waiting:
                    return
                continue
            try:
                running = self._step(running, admitted)
            except Exception as exc:
                if not isinstance(exc, GptstoreError):
                    log.exception("deployment %s: the continuous batch failed", self.name)
                    exc = PluginError(
                        f"deployment {self.name!r} (backend {self.backend}) failed; see the "
                        "server log"
                    )
                seats = [*(running.seats if running is not None else []), *admitted]
                for seat in seats:
                    self._fail(seat.tally, exc)
                running = None

    def _step(self, running: _Running | None, admitted: list[_Seat]) -> _Running | None:
        """One token for every running row, and the first for every admitted one."""
        import numpy as np

        seats = [*(running.seats if running is not None else []), *admitted]
        adapters = [s.row.request.adapter for s in seats]
        if any(adapters):
            self.stepper.use_adapters(adapters)
        if running is not None:
            ids = np.asarray([[s.token] for s in running.seats], dtype=np.int64)
            mask = np.concatenate(
                [running.mask, np.ones((len(running.seats), 1), dtype=np.int64)], axis=1
            )
            logits, state = self.stepper.forward_step(
                ids,
                mask,
                running.positions[:, None],
                running.state,
                [s.row.request.adapter for s in running.seats],
            )
            running = _Running(running.seats, mask, running.positions + 1, state)
            self._pick(running.seats, logits)
        if admitted:
            width = max(len(s.ids) for s in admitted)
            pad = self.decoder.tokenizer.pad_token_id or 0
            ids = np.asarray([[pad] * (width - len(s.ids)) + s.ids for s in admitted], np.int64)
            mask = np.asarray(
                [[0] * (width - len(s.ids)) + [1] * len(s.ids) for s in admitted], np.int64
            )
            positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
            logits, state = self.stepper.forward_step(
                ids, mask, positions, None, [s.row.request.adapter for s in admitted]
            )
            joined = _Running(admitted, mask, positions[:, -1] + 1, state)
            self._pick(admitted, logits)
            running = joined if running is None else self._join(running, joined)
        assert running is not None
        stats = self.stats
        stats.batches += 1
        stats.rows += len(running.seats)
        stats.largest = max(stats.largest, len(running.seats))
        for seat in running.seats:
            self._emit(seat)
        return self._leave(running)

    def _pick(self, seats: Sequence[_Seat], logits: Any) -> None:
        import numpy as np

        logits = np.asarray(logits, dtype=np.float32)
        for index, seat in enumerate(seats):
            seat.token = self.decoder.choose(seat.row, logits[index])

    def _join(self, first: _Running, second: _Running) -> _Running:
        import numpy as np

        width = max(first.mask.shape[1], second.mask.shape[1])
        pads = (width - first.mask.shape[1], width - second.mask.shape[1])
        mask = np.concatenate(
            [
                np.pad(first.mask, ((0, 0), (pads[0], 0))),
                np.pad(second.mask, ((0, 0), (pads[1], 0))),
            ]
        )
        state = self.stepper.cache_join(first.state, pads[0], second.state, pads[1])
        positions = np.concatenate([first.positions, second.positions])
        return _Running([*first.seats, *second.seats], mask, positions, state)

    def _leave(self, running: _Running) -> _Running | None:
        """The batch without its finished rows and those nobody waits for, trimmed of padding
        every remaining row has."""
        keep = [
            i
            for i, s in enumerate(running.seats)
            if s.row.finish is None and s.tally.job.wanted() and not s.tally.failed
        ]
        if not keep:
            return None
        mask = running.mask[keep]
        drop = int(mask.argmax(axis=1).min())  # leading positions masked in every kept row
        if len(keep) == len(running.seats) and drop == 0:
            return running
        state = self.stepper.cache_select(running.state, keep, drop)
        return _Running(
            [running.seats[i] for i in keep], mask[:, drop:], running.positions[keep], state
        )

    # -- answers ----------------------------------------------------------------------------------

    def _emit(self, seat: _Seat) -> None:
        row, tally = seat.row, seat.tally
        job = tally.job
        if tally.failed:
            return
        if isinstance(job, _StreamJob):
            last = row.logprobs[-1] if row.logprobs else None
            if row.finish is not None:
                _answer(job.push, (seat.index, final_chunk(row, row.text[len(seat.sent) :], last)))
            else:
                safe = visible_text(row)
                if len(safe) > len(seat.sent):
                    _answer(job.push, (seat.index, StreamChunk(safe[len(seat.sent) :], None, last)))
                    seat.sent = safe
                return
        elif row.finish is None:
            return
        else:
            tally.results[seat.index] = Generation(
                text=row.text,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=len(row.tokens),
                finish_reason=row.finish,
                logprobs=tuple(row.logprobs) if row.request.logprobs is not None else None,
            )
        tally.left -= 1
        if tally.left == 0:
            if isinstance(job, _StreamJob):
                _answer(job.push, None)
            else:
                _answer(job.done, [g for g in tally.results if g is not None])

    def _fail(self, tally: _Tally, error: Exception) -> None:
        if tally.failed or tally.left == 0:
            return
        tally.failed = True
        job = tally.job
        _answer(job.push if isinstance(job, _StreamJob) else job.done, error)
