"""A deployment in one process: an artifact loaded on a serving backend, behind its batcher.

A :class:`Deployment` answers ``generate``, ``stream``, ``chat_prompt`` and ``status``. It checks
every request against what its runner declares (context length, log-probabilities) before the
request is queued, so those rules hold for any backend. It runs inside each replica process, or
in the server's own process for ``isolation = "none"``; :mod:`gptstore.deploy` manages them.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

from attrs import Factory, field, frozen

from gptstore.artifacts import ARTIFACT_ID_PATTERN, ArtifactStore
from gptstore.converter import FieldProblem, in_range, unstructure
from gptstore.errors import InvalidInput, PluginError
from gptstore.manager import PluginManager, structure_options
from gptstore.protocols import Runner, StreamChunk
from gptstore.records import ServingBackend
from gptstore.serving.batching import Batcher
from gptstore.serving.continuous import ContinuousBatcher
from gptstore.serving.decoding import DecodingRunner, check_context, check_request
from gptstore.types import Artifact, ChatMessage, Generation, GenerationRequest, RunnerInfo

#: Deployment names: 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
MAX_BATCH, MAX_QUEUE, MAX_REPLICAS = 256, 100_000, 64


@frozen(kw_only=True)
class Autoscaling:
    """``[deployments.NAME.autoscaling]`` (engine ray only): Serve adds replicas, up to
    ``max_replicas``, while the calls in flight per replica stay above
    ``target_ongoing_requests`` for ``upscale_delay_s``, and removes them, down to
    ``min_replicas``, once they stay below it for ``downscale_delay_s``."""

    min_replicas: int = field(default=1, validator=in_range(1, MAX_REPLICAS))
    max_replicas: int = field(default=2, validator=in_range(1, MAX_REPLICAS))
    target_ongoing_requests: float = field(default=2.0, validator=in_range(0.01, 65536))
    upscale_delay_s: float = field(default=30.0, validator=in_range(0, 86400))
    downscale_delay_s: float = field(default=600.0, validator=in_range(0, 86400))

    def __attrs_post_init__(self) -> None:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )


def _distinct(_instance: Any, _attribute: Any, value: tuple[str, ...]) -> None:
    twice = sorted({a for a in value if value.count(a) > 1})
    if twice:
        raise FieldProblem("adapters", f"adapters lists {twice[0]!r} twice")
    if len(value) > 1024:
        raise FieldProblem("adapters", "at most 1024 adapters per deployment")


@frozen(kw_only=True)
class DeploymentSpec:
    """An artifact served on a backend: ``[deployments.NAME]`` in a config file, or the body of
    ``POST /store/deployments`` (with its ``name``).

    Requests are decoded in batches of up to ``max_batch`` rows; at most ``max_queue`` requests
    wait, and more are refused with 429 and Retry-After. ``batching``: ``continuous`` (requests
    join the running batch at its next step and leave it when done; for runners of the shared
    decode loop whose backend supports it) or ``static`` (a batch runs until its longest row is
    done). ``kv_cache_mb``: the most KV cache the running batch may hold (continuous only).

    ``replicas`` worker processes each load the model (``isolation = "process"``, the default:
    a replica that crashes takes nothing else down and is restarted); ``isolation = "none"``
    runs one replica inside the server's process (no process hop, no crash isolation). With
    ``gptstore serve --engine ray`` the replicas are Ray Serve replicas, and ``autoscaling``
    may replace ``replicas`` with bounds (see :class:`Autoscaling`).

    ``adapters``: LoRA adapter artifacts of this deployment's artifact, each served as its own
    model (its artifact id is the name a request gives as ``model``) on the one loaded base: an
    adapter is loaded on its first request, rows of different adapters decode in one batch,
    and past ``max_adapters`` loaded the least recently used one that no running row needs is
    unloaded. The backend's runner must declare ``RunnerInfo.adapters`` (torch does; on onnx,
    deploy each adapter merged and exported as its own deployment).
    """

    artifact: str = field(metadata={"json_schema": {"pattern": ARTIFACT_ID_PATTERN}})
    backend: str
    options: dict[str, Any] = Factory(dict)
    max_batch: int = field(default=8, validator=in_range(1, MAX_BATCH))
    max_queue: int = field(default=64, validator=in_range(1, MAX_QUEUE))
    replicas: int = field(default=1, validator=in_range(1, MAX_REPLICAS))
    isolation: Literal["process", "none"] = "process"
    batching: Literal["continuous", "static"] = "continuous"
    kv_cache_mb: int | None = field(default=None, validator=in_range(1, 1 << 24))
    autoscaling: Autoscaling | None = None
    adapters: tuple[str, ...] = field(
        default=(),
        validator=_distinct,
        metadata={"json_schema": {"items": {"pattern": ARTIFACT_ID_PATTERN}, "max_items": 1024}},
    )
    max_adapters: int = field(default=8, validator=in_range(1, 1024))

    def most_replicas(self) -> int:
        """The replicas it may run at once: ``replicas``, or its autoscaling bound."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.replicas


def check_engine(name: str, spec: DeploymentSpec, engine: str, where: str = "$") -> None:
    """InvalidInput when ``spec`` asks for what ``engine`` (``local`` or ``ray``) cannot do."""
    if spec.autoscaling is not None and (engine != "ray" or spec.isolation == "none"):
        raise InvalidInput(
            f"deployment {name!r}",
            [
                "autoscaling needs the ray engine (gptstore serve --engine ray, or [server] "
                'engine = "ray") and isolation = "process"; give a fixed number of replicas '
                f"instead @ {where}.autoscaling"
            ],
        )


def answered(generations: Sequence[Generation], started: float) -> dict[str, Any]:
    """A call's figures for the metrics (``started``: its ``time.perf_counter()`` at start)."""
    return {
        "prompt_tokens": sum(g.prompt_tokens for g in generations),
        "generation_tokens": sum(g.completion_tokens for g in generations),
        "e2e": time.perf_counter() - started,
    }


class StreamTally:
    """A stream's figures for the metrics as its chunks pass: its chunks with text count as its
    generated tokens (a chunk holds one token, or a few when a character spans them), the time
    to the first of them as its time to first token."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.chunks = 0

    def saw(self, chunk: StreamChunk) -> None:
        if chunk.text:
            self.chunks += 1
            if self.first is None:
                self.first = time.perf_counter() - self.started

    def figures(self, prompt_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "generation_tokens": self.chunks,
            "e2e": time.perf_counter() - self.started,
            "ttft": self.first,
        }


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
    #: The LoRA adapters it serves on its artifact, by name (their artifact ids).
    adapters: Mapping[str, Artifact] = Factory(dict)


def plan(
    manager: PluginManager,
    artifacts: ArtifactStore,
    artifact_id: str,
    backend: str,
    options: Mapping[str, Any] | None,
    *,
    adapters: Sequence[str] = (),
    where: str = "$.options",
    adapters_where: str = "$.adapters",
) -> Plan:
    """Check that ``artifact_id`` exists, ``backend`` is installed, ``options`` are its
    options (problems named at ``where``) and each of ``adapters`` is a LoRA adapter of that
    artifact (named at ``adapters_where``), without loading anything."""
    artifact = artifacts.get(artifact_id)
    record = manager.get(ServingBackend, backend)
    checked = {
        name: adapter_artifact(artifacts, artifact, name, f"{adapters_where}[{i}]")
        for i, name in enumerate(adapters)
    }
    return Plan(
        artifact, record, structure_options(record, dict(options or {}), where=where), checked
    )


def adapter_artifact(artifacts: ArtifactStore, base: Artifact, name: str, where: str) -> Artifact:
    """Adapter ``name`` of ``base``, or InvalidInput saying why it cannot be served on it."""
    import json

    found = artifacts.find(name)
    if found is None:
        raise InvalidInput("adapters", [f"no artifact {name!r} in the store @ {where}"])
    config_file = found.path / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidInput(
            "adapters",
            [
                f"{name!r} is not a PEFT adapter (no adapter_config.json); deploy it on its "
                f"own @ {where}"
            ],
        )
    if found.manifest.parent != base.id:
        raise InvalidInput(
            "adapters",
            [
                f"{name!r} was made from {found.manifest.parent or 'no recorded parent'}, not from "
                f"this deployment's artifact {base.id} @ {where}"
            ],
        )
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        raise InvalidInput(
            "adapters", [f"{name!r}: adapter_config.json is not JSON @ {where}"]
        ) from None
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else str(config.get("peft_type"))
        raise InvalidInput(
            "adapters",
            [
                f"{name!r} is a {kind} adapter: rows of different adapters share a batch only with "
                f"LoRA; deploy it as its own deployment (artifact = {name!r}) @ {where}"
            ],
        )
    return found


def load_runner(plan: Plan) -> Runner:
    """Load a checked deployment's model. Every interface (``gptstore chat``, ``serve``, the
    store API) loads through here, so options are structured and refused the same way."""
    runner: Runner = plan.backend.factory(plan.options).load(plan.artifact)
    return runner


def batcher(runner: Runner, name: str, spec: DeploymentSpec, backend: str) -> Batcher:
    """The deployment's batcher: continuous when asked and the runner can, else static."""
    if spec.batching == "continuous" and isinstance(runner, DecodingRunner) and runner.continuous:
        budget = spec.kv_cache_mb * 2**20 if spec.kv_cache_mb else None
        return ContinuousBatcher(
            runner,
            name,
            max_batch=spec.max_batch,
            max_queue=spec.max_queue,
            backend=backend,
            kv_budget=budget,
        )
    return Batcher(
        runner, name, max_batch=spec.max_batch, max_queue=spec.max_queue, backend=backend
    )


class Health(TypedDict):
    ok: bool
    message: str


class BatchCounts(TypedDict):
    batches: int
    rows: int
    largest: int
    streams: int


class ReplicaStatus(TypedDict):
    replica: str
    state: str
    pid: int | None
    outstanding: int
    served: int
    restarts: int
    lost: int
    error: str | None


class VersionInfo(TypedDict):
    """One version in a deployment's history: what it served, when, made by which key, and how
    it ended (live, canary, replaced, rolled back, failed: why)."""

    version: int
    artifact: str
    backend: str
    options: dict[str, Any]
    replicas: int
    at: str
    by: str
    outcome: str
    spec: dict[str, Any]


class CanaryInfo(TypedDict):
    version: int
    percent: float


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
    #: The adapters it serves as models of their own.
    adapters: list[str]
    batches: BatchCounts
    created_at: str
    health: Health
    replicas: list[ReplicaStatus]
    version: int
    canary: CanaryInfo | None
    swap: dict[str, Any]
    versions: list[VersionInfo]


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
        if plan.adapters:
            if not (self.info.adapters and isinstance(runner, DecodingRunner)):
                raise InvalidInput(
                    f"deployment {name!r}",
                    [
                        f"backend {self.backend} does not apply LoRA adapters at run time: merge "
                        "each one (lora with merge = true, then the backend's export) and deploy "
                        "the merged artifacts as deployments of their own @ $.adapters"
                    ],
                )
            runner.set_adapters(
                {n: a.path for n, a in plan.adapters.items()}, budget=spec.max_adapters
            )
        self.batcher = batcher(runner, name, spec, self.backend)
        self.created_at = datetime.now(UTC)
        self.served = 0
        #: Called as each call ends, with its error (None: answered) and its figures
        #: (``prompt_tokens``, ``generation_tokens``, ``e2e``, ``ttft``); set by the deployment
        #: manager to count it in the metrics.
        self.observe: Callable[..., None] | None = None

    def check(self, requests: Sequence[GenerationRequest]) -> None:
        """Refuse, before queueing, what the runner says it cannot do."""
        for request in requests:
            check_request(request)
            if request.adapter is not None and request.adapter not in self.spec.adapters:
                raise InvalidInput(
                    "request",
                    [
                        f"{request.adapter!r} is not an adapter of deployment {self.name!r} "
                        f"(it has: {', '.join(self.spec.adapters) or 'none'}) @ $.model"
                    ],
                )
            lacks = [
                what
                for what, asked, can in (
                    (
                        "return log-probabilities; leave out logprobs",
                        request.logprobs is not None,
                        self.info.logprobs,
                    ),
                    (
                        "apply presence_penalty, frequency_penalty or logit_bias; leave them out",
                        bool(
                            request.presence_penalty
                            or request.frequency_penalty
                            or request.logit_bias
                        ),
                        self.info.penalties,
                    ),
                    (
                        "follow a grammar; leave out response_format and tools",
                        request.constraint is not None,
                        self.info.constraints,
                    ),
                )
                if asked and not can
            ]
            if lacks:
                raise InvalidInput(
                    "request",
                    [f"deployment {self.name!r} (backend {self.backend}) does not {lacks[0]}"],
                )
        if self.info.context_length:
            counted: dict[str, int] = {}
            for request in requests:
                if request.prompt not in counted:
                    counted[request.prompt] = self.runner.count_tokens(request.prompt)
                check_context(counted[request.prompt], request.max_tokens, self.info.context_length)

    async def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The messages rendered with the model's chat template."""
        return self.runner.chat_prompt(messages)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The generations of ``requests``, batched with whatever else is waiting."""
        started = time.perf_counter()
        try:
            self.check(requests)
            generations = await self.batcher.generate(requests)
        except BaseException as exc:
            self._observe(exc)
            raise
        self.served += 1
        self._observe(None, **answered(generations, started))
        return generations

    def stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        """The chunks of each request in turn, with the request's index (see
        :meth:`Batcher.stream`)."""
        try:
            self.check(requests)
        except BaseException as exc:
            self._observe(exc)
            raise
        if self.observe is None:
            return self.batcher.stream(requests)
        return self._observed(requests)

    async def _observed(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        """A stream whose end is observed: its chunks with text as its generated tokens, the
        time to the first as its time to first token (as the router counts a replica's)."""
        tally = StreamTally()
        try:
            async with contextlib.aclosing(self.batcher.stream(requests)) as items:
                async for index, chunk in items:
                    tally.saw(chunk)
                    yield index, chunk
        except BaseException as exc:
            self._observe(exc, generation_tokens=tally.chunks)
            raise
        prompt_tokens = sum(self.runner.count_tokens(r.prompt) for r in requests)
        self._observe(None, **tally.figures(prompt_tokens))

    def _observe(self, error: BaseException | None, **figures: Any) -> None:
        if self.observe is not None:
            self.observe(error, **figures)

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
            "adapters": list(self.spec.adapters),
            "batches": {
                "batches": self.batcher.stats.batches,
                "rows": self.batcher.stats.rows,
                "largest": self.batcher.stats.largest,
                "streams": self.batcher.stats.streams,
            },
            "created_at": self.created_at.isoformat(),
            "health": {"ok": ok, "message": message},
            "replicas": [
                {
                    "replica": f"{self.name}/0",
                    "state": "ready" if ok else "dead",
                    "pid": os.getpid(),
                    "outstanding": 0,
                    "served": self.served,
                    "restarts": 0,
                    "lost": 0,
                    "error": None if ok else message,
                }
            ],
            "version": 1,
            "canary": None,
            "swap": {"state": "idle"},
            "versions": [
                {
                    "version": 1,
                    "artifact": self.artifact.id,
                    "backend": self.backend,
                    "options": self.spec.options,
                    "replicas": 1,
                    "at": self.created_at.isoformat(),
                    "by": "config",
                    "outcome": "live",
                    "spec": unstructure(self.spec),
                }
            ],
        }

    def close(self) -> None:
        """Answer what is queued, then unload the model."""
        self.batcher.close()
        self.runner.close()
