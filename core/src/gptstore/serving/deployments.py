"""Deployments: artifacts loaded on serving backends, by name, each behind its batcher.

A :class:`Deployment` is what the HTTP layer talks to: ``generate``, ``stream``, ``chat_prompt``
and ``status``. It checks every request against what its runner declares (context length,
log-probabilities) before the request is queued, so those rules hold for any backend.
:class:`Deployments` creates, lists and deletes them, and knows which are loading or failed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict

from attrs import Factory, field, frozen

from gptstore.artifacts import ARTIFACT_ID_PATTERN, ArtifactStore
from gptstore.converter import in_range
from gptstore.errors import Conflict, InvalidInput, NotFound, PluginError, Unavailable
from gptstore.manager import PluginManager, structure_options
from gptstore.protocols import Runner, StreamChunk
from gptstore.records import ServingBackend
from gptstore.serving.batching import Batcher
from gptstore.serving.decoding import check_context, check_request
from gptstore.types import Artifact, ChatMessage, Generation, GenerationRequest, RunnerInfo

#: Deployment names: 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_BATCH, MAX_QUEUE = 256, 100_000


@frozen(kw_only=True)
class DeploymentSpec:
    """An artifact served on a backend: ``[deployments.NAME]`` in a config file, or the body of
    ``POST /store/deployments`` (with its ``name``).

    Requests are decoded in batches of up to ``max_batch`` rows; at most ``max_queue`` requests
    wait, and more are refused with 429 and Retry-After.
    """

    artifact: str = field(metadata={"json_schema": {"pattern": ARTIFACT_ID_PATTERN}})
    backend: str
    options: dict[str, Any] = Factory(dict)
    max_batch: int = field(default=8, validator=in_range(1, MAX_BATCH))
    max_queue: int = field(default=64, validator=in_range(1, MAX_QUEUE))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            "deployment name", [f"{name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-'"]
        )
    return name


@frozen
class Plan:
    """A deployment checked and ready to load: everything but the model's weights."""

    artifact: Artifact
    backend: ServingBackend
    options: Any


def plan(
    manager: PluginManager,
    artifacts: ArtifactStore,
    artifact_id: str,
    backend: str,
    options: Mapping[str, Any] | None,
    *,
    where: str = "$.options",
) -> Plan:
    """Check that ``artifact_id`` exists, ``backend`` is installed and ``options`` are its
    options (problems named at ``where``), without loading anything."""
    artifact = artifacts.get(artifact_id)
    record = manager.get(ServingBackend, backend)
    return Plan(artifact, record, structure_options(record, dict(options or {}), where=where))


def load_runner(plan: Plan) -> Runner:
    """Load a checked deployment's model. Every interface (``gptstore chat``, ``serve``, the
    store API) loads through here, so options are structured and refused the same way."""
    runner: Runner = plan.backend.factory(plan.options).load(plan.artifact)
    return runner


class Health(TypedDict):
    ok: bool
    message: str


class BatchCounts(TypedDict):
    batches: int
    rows: int
    largest: int
    streams: int


class DeploymentStatus(TypedDict):
    """What :meth:`Deployment.status` says (the store API's deployment objects)."""

    name: str
    artifact: str
    backend: str
    options: dict[str, Any]
    max_batch: int
    max_queue: int
    context_length: int | None
    logprobs: bool
    batches: BatchCounts
    created_at: str
    health: Health


class Deployment:
    """One loaded artifact behind its batcher; the only thing the HTTP layer talks to."""

    def __init__(self, name: str, spec: DeploymentSpec, plan: Plan, runner: Runner) -> None:
        self.name = name
        self.spec = spec
        self.artifact = plan.artifact
        self.backend = plan.backend.name
        self.runner = runner
        try:
            self.info: RunnerInfo = runner.info()
        except (ValueError, TypeError) as exc:  # RunnerInfo refused what the runner declared
            raise PluginError(
                f"backend {self.backend}: its runner's info() failed: {exc}"
            ) from None
        self.batcher = Batcher(
            runner, name, max_batch=spec.max_batch, max_queue=spec.max_queue, backend=self.backend
        )
        self.created_at = datetime.now(UTC)

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Refuse, before queueing, what the runner says it cannot do."""
        for request in requests:
            check_request(request)
            if request.logprobs is not None and not self.info.logprobs:
                raise InvalidInput(
                    "request",
                    [
                        f"deployment {self.name!r} (backend {self.backend}) does not return "
                        "log-probabilities; leave out logprobs"
                    ],
                )
        if self.info.context_length:
            counted: dict[str, int] = {}
            for request in requests:
                if request.prompt not in counted:
                    counted[request.prompt] = self.runner.count_tokens(request.prompt)
                check_context(counted[request.prompt], request.max_tokens, self.info.context_length)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The messages rendered with the model's chat template."""
        return self.runner.chat_prompt(messages)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The generations of ``requests``, batched with whatever else is waiting."""
        self.check(requests)
        return await self.batcher.generate(requests)

    def stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        """The chunks of each request in turn, with the request's index (see
        :meth:`Batcher.stream`)."""
        self.check(requests)
        return self.batcher.stream(requests)

    def status(self) -> DeploymentStatus:
        """What the store API shows: the spec, the runner's health and the batch statistics."""
        health = self.runner.health()
        ok, message = health.ok, health.message
        if not self.batcher.alive:
            ok, message = False, "its batch worker has stopped"
        return {
            "name": self.name,
            "artifact": self.artifact.id,
            "backend": self.backend,
            "options": self.spec.options,
            "max_batch": self.spec.max_batch,
            "max_queue": self.spec.max_queue,
            "context_length": self.info.context_length,
            "logprobs": self.info.logprobs,
            "batches": {
                "batches": self.batcher.stats.batches,
                "rows": self.batcher.stats.rows,
                "largest": self.batcher.stats.largest,
                "streams": self.batcher.stats.streams,
            },
            "created_at": self.created_at.isoformat(),
            "health": {"ok": ok, "message": message},
        }

    def close(self) -> None:
        """Answer what is queued, then unload the model."""
        self.batcher.close()
        self.runner.close()


class Deployments:
    """The deployments of one server process (thread-safe), and which are loading."""

    def __init__(self, manager: PluginManager, artifacts: ArtifactStore) -> None:
        self.manager = manager
        self.artifacts = artifacts
        self._items: dict[str, Deployment] = {}
        #: Names taken by a deployment that is not serving: "loading" or "being deleted".
        self._pending: dict[str, str] = {}
        self._closed = False
        self._lock = threading.Lock()

    def plan(self, name: str, spec: DeploymentSpec, *, where: str = "$") -> Plan:
        """Check ``spec`` as deployment ``name`` (its problems named under ``where``)."""
        check_name(name)
        return plan(
            self.manager,
            self.artifacts,
            spec.artifact,
            spec.backend,
            spec.options,
            where=f"{where}.options",
        )

    def create(
        self, name: str, spec: DeploymentSpec, *, where: str = "$", checked: Plan | None = None
    ) -> Deployment:
        """Load ``spec`` as deployment ``name`` (``checked``: its plan, when already made);
        Conflict when the name is taken, Unavailable once :meth:`close` has begun."""
        checked = checked or self.plan(name, spec, where=where)
        with self._lock:
            self._check_open()
            if name in self._items or name in self._pending:
                raise Conflict(f"deployment {name!r} already exists; delete it first")
            self._pending[name] = "loading"
        try:
            runner = load_runner(checked)
            try:
                deployment = Deployment(name, spec, checked, runner)
            except BaseException:
                runner.close()
                raise
            with self._lock:
                closed = self._closed
                if not closed:
                    self._items[name] = deployment
            if closed:  # the server shut down while this one loaded
                deployment.close()
                self._check_open()
        finally:
            with self._lock:
                self._pending.pop(name, None)
        return deployment

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(n for n, state in self._pending.items() if state == "loading")

    def get(self, name: str) -> Deployment:
        with self._lock:
            deployment = self._items.get(name)
            state = self._pending.get(name)
            names = sorted(self._items)
        if deployment is None:
            if state is not None:
                raise Unavailable(f"deployment {name!r} is {state}; retry shortly")
            raise NotFound(f"no deployment {name!r}; deployed: {', '.join(names) or 'none'}")
        return deployment

    def list(self) -> list[Deployment]:
        with self._lock:
            return sorted(self._items.values(), key=lambda d: d.name)

    def delete(self, name: str) -> None:
        """Refuse new requests, answer the queued ones, unload. The name stays taken until the
        model is unloaded, so a new deployment of that name never loads beside the old one."""
        with self._lock:
            deployment = self._items.get(name)
            if deployment is None:
                if name in self._pending:
                    raise Unavailable(
                        f"deployment {name!r} is {self._pending[name]}; retry shortly"
                    )
                raise NotFound(f"no deployment {name!r}")
            self._pending[name] = "being deleted"  # taken while it drains
            del self._items[name]
        try:
            deployment.close()
        finally:
            with self._lock:
                self._pending.pop(name, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            items, self._items = list(self._items.values()), {}
        for deployment in items:
            deployment.close()
