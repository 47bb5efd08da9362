"""Optimization jobs over HTTP: start one (admin), list them, read one, follow its progress as
server-sent events, cancel it (admin). The work is :mod:`gptstore.optimization.jobs`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Annotated, Any, cast

import anyio
from litestar import Controller, Request, delete, get, post
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from gptstore.converter import unstructure
from gptstore.errors import NotFound
from gptstore.optimization.jobs import JOB_ID_PATTERN, EventCursor, Job, JobRequest, Jobs
from gptstore.server.auth import changed_by
from gptstore.server.body import read_body
from gptstore.server.schema import JobStatus, errors, json_body

JOB_ID = Annotated[str, Parameter(pattern=JOB_ID_PATTERN)]
#: Seconds between two looks at a running job's events.
POLL = 0.25


def _status(job: Job) -> JobStatus:
    return cast(JobStatus, unstructure(job))


class JobsController(Controller):
    path = "/store/jobs"
    opt: Mapping[str, Any] = MappingProxyType({"role": "user"})

    @post(
        "/",
        status_code=201,
        opt={"role": "admin"},
        operation_class=json_body(JobRequest),
        responses=errors(400, 401, 403, 404, 413),
    )
    async def start(self, state: State, request: Request[Any, Any, Any]) -> JobStatus:
        """Start an optimization job: one ``strategy`` (with ``options`` and ``data``), or a
        ``recipe`` (sent) or ``recipe_file`` (in $GPTSTORE_HOME/recipes), on ``artifact``. It is
        checked first (400 naming what is wrong), then runs in a process of its own: 201 with
        its record, ``queued`` or ``running``."""
        body = await read_body(request, JobRequest)
        jobs: Jobs = state.jobs
        by = changed_by(request)
        return _status(await anyio.to_thread.run_sync(lambda: jobs.submit(body, by=by)))

    @get("/", sync_to_thread=True, responses=errors(400, 401, 404))
    def list_jobs(
        self,
        state: State,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="the most jobs listed")] = 100,
        before: Annotated[
            str | None,
            Parameter(
                pattern=JOB_ID_PATTERN,
                description="list the jobs older than this job id (the next page)",
            ),
        ] = None,
    ) -> list[JobStatus]:
        """The jobs, the newest first: ``limit`` of them, older than ``before`` when given
        (pass the last id of a page to get the next)."""
        jobs: Jobs = state.jobs
        listed = jobs.list()
        if before is not None:
            ids = [job.id for job in listed]
            if before not in ids:
                raise NotFound(f"no job {before!r} (before=)")
            listed = listed[ids.index(before) + 1 :]
        return [_status(job) for job in listed[:limit]]

    @get("/{job_id:str}", sync_to_thread=True, responses=errors(400, 401, 404))
    def show(self, state: State, job_id: JOB_ID) -> JobStatus:
        jobs: Jobs = state.jobs
        return _status(jobs.get(job_id))

    @get(
        "/{job_id:str}/events",
        responses={
            **errors(400, 401, 404),
            200: ResponseSpec(
                data_container=str,
                media_type="text/event-stream",
                description="Server-sent events: `progress` ones (`{at, progress, message}`, "
                "their `id` the report's number, so `Last-Event-ID` resumes), then one `end` "
                "whose data is the job's record",
                generate_examples=False,
            ),
        },
    )
    async def events(
        self, state: State, request: Request[Any, Any, Any], job_id: JOB_ID
    ) -> ServerSentEvent:
        """The job's progress as it happens (from the start, or after ``Last-Event-ID``),
        ending with its record once it has ended."""
        jobs: Jobs = state.jobs
        await anyio.to_thread.run_sync(jobs.get, job_id)  # 404 before any event
        header = request.headers.get("last-event-id", "0").strip()
        seen = int(header) if header.isascii() and header.isdecimal() else 0
        drain = request.app.state.drain
        return ServerSentEvent(_follow(jobs, job_id, seen, drain))

    @delete(
        "/{job_id:str}",
        status_code=200,
        opt={"role": "admin"},
        responses=errors(400, 401, 403, 404, 409),
    )
    async def cancel(self, state: State, job_id: JOB_ID) -> JobStatus:
        """Cancel a queued or running job; it stops, and leaves no half artifact (409 once it
        has ended)."""
        jobs: Jobs = state.jobs
        return _status(await anyio.to_thread.run_sync(jobs.cancel, job_id))


async def _follow(
    jobs: Jobs, job_id: str, seen: int, drain: Any
) -> AsyncIterator[ServerSentEventMessage]:
    cursor = EventCursor()
    while not drain.draining:
        # The record first: once it says ended, every event was written before it.
        job = await anyio.to_thread.run_sync(jobs.get, job_id)
        for event in await anyio.to_thread.run_sync(jobs.events, job_id, seen, cursor):
            seen = event.pop("n")
            yield ServerSentEventMessage(data=json.dumps(event), event="progress", id=seen)
        if job.ended:
            yield ServerSentEventMessage(data=json.dumps(_status(job)), event="end")
            return
        await asyncio.sleep(POLL)
