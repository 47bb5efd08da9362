"""The routing side: a deployment served by versions of replica processes, swapped live.

:class:`ReplicatedDeployment` answers the HTTP layer exactly as an in-process
:class:`~gptstore.serving.deployments.Deployment` does (``generate``, ``stream``,
``chat_prompt``, ``status``, ``close``), and sends each call to one replica of its live version
(or of its canary, for the canary's share of calls):

- **Routing**: power of two choices on outstanding calls (Ray Serve's router): two ready
  replicas at random, the one with fewer calls in flight wins. It needs no global scan and no
  shared state, and spreads load as well as least-outstanding over all replicas in practice.
- **Retry once**: a call whose replica dies, or stops taking calls, before the client has
  received a byte is sent once more, to another ready replica (of any version). A stream is
  retried only before its first chunk.
- **Restart**: a replica that dies is started again after a backoff that doubles while it keeps
  failing (0.5 s, 1 s, 2 s ... 30 s) and resets once it has stayed up a minute. The others go on
  serving meanwhile, and ``status()`` shows every replica's state.
- **Swap** (:meth:`ReplicatedDeployment.swap`): the new version's replicas start, load and
  answer probe prompts (and, when asked, pass a perplexity gate against the live version) while
  the live version serves every call; only then does traffic move, all at once or as a canary
  share. The old version gets no new call, finishes those in flight and stops. A failure at any
  point stops only the new replicas: the live version never stopped serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import asdict, define, field, frozen

from gptstore.converter import in_range, structure, unstructure
from gptstore.deploy.metrics import DeploymentSnapshot, Metrics, status_of
from gptstore.deploy.replicas import Replica, ReplicaLost
from gptstore.errors import (
    Conflict,
    GptstoreError,
    InvalidInput,
    PluginError,
    SwapFailed,
    Unavailable,
)
from gptstore.protocols import StreamChunk
from gptstore.serving.deployments import (
    DeploymentSpec,
    DeploymentStatus,
    Plan,
    ReplicaStatus,
    StreamTally,
    answered,
)
from gptstore.types import ChatMessage, Generation, GenerationRequest, RunnerInfo

log = logging.getLogger("gptstore.server")

#: Seconds a replica may take to load its model.
LOAD_TIMEOUT = 600.0
#: Seconds a replica has to finish its calls in flight when it is stopped.
DRAIN_TIMEOUT = 120.0
#: Seconds each probe prompt may take on a new version's replica.
PROBE_TIMEOUT = 120.0
BACKOFF_FIRST, BACKOFF_MOST, STEADY_AFTER = 0.5, 30.0, 60.0
#: What a new version must answer, on every replica, before it takes traffic.
PROBES = (
    GenerationRequest(prompt="Hello", max_tokens=4),
    GenerationRequest(prompt="The capital of France is", max_tokens=4, temperature=0.7, seed=1),
)
#: Versions a deployment's history keeps.
HISTORY = 50


def choose(replicas: Sequence[Replica], avoid: Sequence[Replica] = ()) -> Replica | None:
    """Power of two choices among the ready replicas not in ``avoid``: the one of two, drawn at
    random, with fewer outstanding calls (None when no replica is ready)."""
    ready = [r for r in replicas if r.state == "ready" and r not in avoid]
    if len(ready) <= 1:
        return ready[0] if ready else None
    first, second = random.sample(ready, 2)
    return first if first.outstanding <= second.outstanding else second


@frozen(kw_only=True)
class SwapGate:
    """A swap's optional quality gate: the new version's perplexity on ``texts`` (default: the
    held-out part of the built-in corpus), through its backend's log-probabilities, may be at
    most ``max_perplexity_ratio`` times the live version's."""

    max_perplexity_ratio: float = field(validator=in_range(1, 1000))
    texts: tuple[str, ...] = ()


@define(kw_only=True)
class VersionRecord:
    """One version of a deployment, as its history keeps it."""

    version: int
    artifact: str
    backend: str
    options: dict[str, Any] = field(factory=dict)
    replicas: int = 1
    at: str = field(factory=lambda: datetime.now(UTC).isoformat())
    by: str = "config"
    #: live, canary, replaced, rolled back, failed: <why>
    outcome: str = "live"
    spec: dict[str, Any] = field(factory=dict)


class ReplicaSet:
    """One version's replicas (see the module's text on restarts)."""

    def __init__(
        self, label: str, version: int, spec: DeploymentSpec, plan: Plan, load: dict[str, Any]
    ) -> None:
        self.version = version
        self.spec = spec
        self.plan = plan
        self.replicas = [Replica(f"{label}/v{version}/{i}", load) for i in range(spec.replicas)]
        for replica in self.replicas:
            replica.version = version
            replica.on_death = self._restart_later
        self.info = RunnerInfo(context_length=None, logprobs=False)
        self._closing = False
        self._restarting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every replica; if one fails to load, stop the others and raise its error."""
        results = await asyncio.gather(
            *(r.start(LOAD_TIMEOUT) for r in self.replicas), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.aclose()
            raise failed[0]
        first = self.replicas[0].ready
        self.info = RunnerInfo(
            context_length=first.get("context_length"), logprobs=bool(first.get("logprobs"))
        )

    def ready(self) -> int:
        return sum(r.state == "ready" for r in self.replicas)

    def size(self) -> int:
        """Its replicas: what counts against the server's max_replicas."""
        return len(self.replicas)

    def states(self) -> Counter[str]:
        return Counter(r.state for r in self.replicas)

    def split(self, most: int) -> tuple[int, int]:
        """Its calls in flight as (running, waiting): up to ``most`` running per replica."""
        running = sum(min(r.outstanding, most) for r in self.replicas)
        waiting = sum(max(r.outstanding - most, 0) for r in self.replicas)
        return running, waiting

    def describe(self) -> list[ReplicaStatus]:
        return [r.describe() for r in self.replicas]

    def _restart_later(self, replica: Replica) -> None:
        if self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._restart(replica))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _restart(self, replica: Replica) -> None:
        steady = time.monotonic() - replica.started_at >= STEADY_AFTER
        delay = (
            BACKOFF_FIRST
            if steady
            else min(BACKOFF_MOST, BACKOFF_FIRST * 2 ** min(replica.restarts, 6))
        )
        while True:
            await asyncio.sleep(delay)
            if self._closing:
                return
            replica.restarts += 1
            try:
                await replica.start(LOAD_TIMEOUT)
            except Exception as exc:
                log.warning("replica %s failed to restart: %s", replica.label, exc)
                delay = min(BACKOFF_MOST, delay * 2)
                continue
            if self.closing():  # stopped while it loaded
                await replica.drain(DRAIN_TIMEOUT)
                return
            log.warning("replica %s restarted (pid %s)", replica.label, replica.pid)
            return

    def closing(self) -> bool:
        return self._closing

    async def aclose(self) -> None:
        """No new call; let those in flight finish; stop every replica."""
        self._closing = True
        restarting = list(self._restarting)
        for task in restarting:
            task.cancel()
        await asyncio.gather(*restarting, return_exceptions=True)
        await asyncio.gather(*(r.drain(DRAIN_TIMEOUT) for r in self.replicas))


#: What runs a version's replicas: :class:`ReplicaSet` (processes on this host), or the Ray
#: engine's :meth:`~gptstore.deploy.ray_engine.RayEngine.replica_set` (a Ray Serve application).
VersionSets = Callable[[str, int, DeploymentSpec, Plan, dict[str, Any]], Any]


class ReplicatedDeployment:
    """A deployment whose versions run as replica processes (see the module's text). Build it
    with :meth:`start` on the server's event loop. ``on_change``: called with the deployment
    after every change of version (to persist it). ``sets``: what runs each version's replicas
    (default: processes on this host)."""

    def __init__(
        self,
        name: str,
        spec: DeploymentSpec,
        plan: Plan,
        load: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        *,
        history: Sequence[VersionRecord] = (),
        by: str = "config",
        version: int | None = None,
        sets: VersionSets = ReplicaSet,
    ) -> None:
        self.name = name
        self.loop = loop
        self._sets = sets
        version = version or max((h.version for h in history), default=0) + 1
        self.live: ReplicaSet = sets(name, version, spec, plan, load)
        self.canary: ReplicaSet | None = None
        self.canary_share = 0.0
        self.history: list[VersionRecord] = list(history)
        restored = next((h for h in self.history if h.version == version), None)
        if restored is not None:  # restored from its record: it keeps its place and its date
            if not restored.outcome.startswith("live"):
                restored.outcome = "live"
        else:
            self.history.append(_record(version, spec, by, "live"))
        self.created_at = datetime.now(UTC)
        #: What a swap in progress is doing, or how the last one ended.
        self.swap_state: dict[str, Any] = {"state": "idle"}
        self.on_change: Callable[[ReplicatedDeployment], None] | None = None
        #: Where its calls and swaps are counted (set by the manager; None: nowhere).
        self.metrics: Metrics | None = None
        self._swap_lock = asyncio.Lock()
        self._closing = False
        #: A new version loading, and old ones finishing their calls: replicas it still holds.
        self._loading: ReplicaSet | None = None
        self._retiring: set[ReplicaSet] = set()

    # The spec, artifact and backend of the live version (what the HTTP layer shows).
    @property
    def spec(self) -> DeploymentSpec:
        return self.live.spec

    @property
    def artifact(self) -> Any:
        return self.live.plan.artifact

    @property
    def backend(self) -> str:
        return self.live.plan.backend.name

    @property
    def info(self) -> RunnerInfo:
        return self.live.info

    @property
    def version(self) -> int:
        return self.live.version

    @property
    def replicas(self) -> list[Replica]:
        return [*self.live.replicas, *(self.canary.replicas if self.canary else [])]

    def processes(self) -> int:
        """Replicas it holds but a version loading: live, canary, and old versions still
        finishing their calls (for the server's max_replicas)."""
        sets = [self.live, *([self.canary] if self.canary else []), *tuple(self._retiring)]
        return sum(s.size() for s in sets)  # the tuple: read off the loop

    async def _retire(self, replicas: ReplicaSet | None) -> None:
        """Stop ``replicas`` (put in ``_retiring`` when they stopped taking calls) once their
        calls in flight are done; :meth:`processes` counts them until then."""
        if replicas is None:
            return
        try:
            await replicas.aclose()
        finally:
            self._retiring.discard(replicas)

    async def start(self) -> None:
        await self.live.start()

    # -- calls ------------------------------------------------------------------------------

    def _pick(self, avoid: Sequence[Replica]) -> Replica:
        sets = [self.live]
        canary = self.canary
        if canary is not None and random.random() < self.canary_share:
            sets.insert(0, canary)
        elif canary is not None:
            sets.append(canary)
        for replicas in sets:
            replica = choose(replicas.replicas, avoid)
            if replica is not None:
                return replica
        states = ", ".join(f"{r.label} {r.state}" for r in self.replicas)
        raise Unavailable(
            f"deployment {self.name!r} has no ready replica ({states}); retry shortly"
        )

    async def _ask(self, op: str, **payload: Any) -> tuple[dict[str, Any], Replica]:
        tried: list[Replica] = []
        while True:
            replica = self._pick(tried)
            try:
                return await replica.ask(op, **payload), replica
            except ReplicaLost:
                tried.append(replica)
                if len(tried) > 1 or self._closing:
                    raise

    def _observe(self, version: int, status: int, **figures: Any) -> None:
        if self.metrics is not None:
            self.metrics.request(self.name, version, status, **figures)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        started = time.perf_counter()
        try:
            answer, replica = await self._ask("generate", requests=unstructure(list(requests)))
            generations = structure(
                answer["generations"], list[Generation], what="replica answer", path="$"
            )
        except BaseException as exc:
            self._observe(self.version, status_of(exc))
            raise
        self._observe(replica.version, 200, **answered(generations, started))
        return generations

    def stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        return self._stream(unstructure(list(requests)))

    async def _stream(self, payload: Any) -> AsyncGenerator[tuple[int, StreamChunk], None]:
        """The chunks (see :meth:`stream`); recorded in the metrics as it ends (see
        :class:`~gptstore.serving.deployments.StreamTally`)."""
        tally = StreamTally()
        prompt_tokens = 0
        version = self.version
        tried: list[Replica] = []
        try:
            while True:
                replica = self._pick(tried)
                version = replica.version
                sent = False
                try:
                    async with contextlib.aclosing(
                        replica.call("stream", requests=payload)
                    ) as answers:
                        async for message in answers:
                            if message["op"] == "done":
                                prompt_tokens = int(message.get("prompt_tokens", 0))
                            if message["op"] != "chunk":
                                continue
                            sent = True
                            chunk = structure(message["chunk"], StreamChunk, what="chunk", path="$")
                            tally.saw(chunk)
                            yield message["index"], chunk
                    break
                except ReplicaLost:
                    tried.append(replica)
                    if sent or len(tried) > 1 or self._closing:
                        raise
        except BaseException as exc:
            self._observe(version, status_of(exc), generation_tokens=tally.chunks)
            raise
        self._observe(version, 200, **tally.figures(prompt_tokens))

    async def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        answer, _replica = await self._ask("chat_prompt", messages=unstructure(list(messages)))
        return str(answer["prompt"])

    # -- versions ----------------------------------------------------------------------------

    async def swap(
        self,
        spec: DeploymentSpec,
        plan: Plan,
        load: dict[str, Any],
        *,
        canary: float | None = None,
        gate: SwapGate | None = None,
        by: str = "config",
        counted: Callable[[], None] | None = None,
    ) -> VersionRecord:
        """Replace the live version with ``spec`` (see the module's text); with ``canary``
        (a percentage), send that share of calls to it and keep the live version until
        :meth:`promote` or :meth:`rollback`. The new version's record says how it ended; a
        failure raises its error after the new replicas are stopped. ``counted`` is called
        the moment :meth:`processes` counts the new version (live or canary)."""
        self._check_free()
        async with self._swap_lock:
            record, old = await self._swap(
                spec, plan, load, canary=canary, gate=gate, by=by, counted=counted
            )
        await self._retire(old)
        return record

    def _check_free(self) -> None:
        if self._closing:
            raise Unavailable(f"deployment {self.name!r} is being deleted")
        if self._swap_lock.locked():
            raise Conflict(
                f"deployment {self.name!r} is changing versions ({self.swap_state['state']}); "
                "wait for it"
            )

    async def _swap(
        self,
        spec: DeploymentSpec,
        plan: Plan,
        load: dict[str, Any],
        *,
        canary: float | None = None,
        gate: SwapGate | None = None,
        by: str = "config",
        outcome: str = "swapped",
        live_as: str = "live",
        counted: Callable[[], None] | None = None,
    ) -> tuple[VersionRecord, ReplicaSet | None]:
        """:meth:`swap`, under the swap lock: the new version's record, and the version it
        replaced (to :meth:`_retire` once the lock is let go). ``outcome``: the swap as the
        metrics count it, ``live_as``: the new version's record once it is live."""
        if self.canary is not None:
            raise Conflict(
                f"deployment {self.name!r} has a canary (version {self.canary.version}); "
                "promote it or roll it back first"
            )
        version = max(h.version for h in self.history) + 1
        record = _record(version, spec, by, "starting")
        self.history.append(record)
        self._trim()
        new = self._loading = self._sets(self.name, version, spec, plan, load)

        def stage(state: str) -> None:
            self.swap_state = {"state": state, "version": version}
            record.outcome = state

        try:
            try:
                stage("loading")
                await new.start()
                stage("probing")
                await self._probe(new)
                if gate is not None:
                    stage("gating")
                    await self._gate(new, gate)
                if self._closing:
                    raise Unavailable("the deployment was deleted while it loaded")
            finally:
                self._loading = None
        except Exception as exc:
            await new.aclose()
            why = str(exc) if isinstance(exc, GptstoreError) else f"{type(exc).__name__}: {exc}"
            if self._closing:
                why = "the deployment was deleted while it loaded"
            record.outcome = f"failed: {why}"
            self.swap_state = {"state": "failed", "version": version, "error": why}
            self._changed("failed")
            if self._closing:
                raise Unavailable(
                    f"deployment {self.name!r} was deleted while its version {version} loaded"
                ) from None
            raise SwapFailed(
                f"version {version} of deployment {self.name!r} failed ({why}); version "
                f"{self.live.version} still serves"
            ) from exc
        except BaseException:
            await new.aclose()
            record.outcome = "failed: interrupted"
            self.swap_state = {"state": "failed", "version": version, "error": "interrupted"}
            raise
        if canary is not None:
            self.canary, self.canary_share = new, canary / 100
            if counted is not None:
                counted()
            record.outcome = "canary"
            self.swap_state = {"state": "canary", "version": version, "percent": canary}
            self._changed("canary")
            return record, None
        old = self.live
        self._retiring.add(old)  # before the switch: processes() never misses it
        self.live = new  # from here on, every new call goes to the new version
        if counted is not None:
            counted()
        record.outcome = live_as
        self._mark(old.version, "replaced")
        self.swap_state = {"state": "done", "version": version}
        self._changed(outcome)
        return record, old

    async def promote(self, by: str = "config") -> VersionRecord:
        """Make the canary the live version."""
        self._check_free()
        async with self._swap_lock:
            new = self.canary
            if new is None:
                raise Conflict(f"deployment {self.name!r} has no canary to promote")
            old = self.live
            self._retiring.add(old)  # before it leaves live: processes() never misses it
            self.live, self.canary, self.canary_share = new, None, 0.0
            self._mark(old.version, "replaced")
            self._mark(new.version, "live")
            self.swap_state = {"state": "done", "version": new.version}
            self._changed("promoted")
        await self._retire(old)
        return self._find(new.version)

    async def rollback(
        self,
        plan_of: Callable[[DeploymentSpec], tuple[Plan, dict[str, Any]]],
        by: str = "config",
        counted: Callable[[], None] | None = None,
    ) -> VersionRecord:
        """Drop the canary when there is one (its calls in flight finish); else swap back to the
        version that was live before this one (its replicas start again). ``plan_of``: the plan
        and load message of a spec."""
        self._check_free()
        old: ReplicaSet | None
        async with self._swap_lock:
            canary = self.canary
            if canary is not None:
                self._retiring.add(canary)  # before it leaves: processes() never misses it
                self.canary, self.canary_share = None, 0.0
                self._mark(canary.version, "rolled back")
                self.swap_state = {"state": "rolled back", "version": canary.version}
                self._changed("rolled_back")
                record, old = self._find(self.live.version), canary
            else:
                record, old = await self._swap_back(plan_of, by, counted)
        await self._retire(old)
        return record

    async def _swap_back(
        self,
        plan_of: Callable[[DeploymentSpec], tuple[Plan, dict[str, Any]]],
        by: str,
        counted: Callable[[], None] | None = None,
    ) -> tuple[VersionRecord, ReplicaSet | None]:
        # The version live before this one: replaced by a swap, never a rejected canary.
        previous = next(
            (
                h
                for h in reversed(self.history)
                if h.version < self.live.version and h.outcome == "replaced"
            ),
            None,
        )
        if previous is None:
            raise Conflict(f"deployment {self.name!r} has no earlier version to roll back to")
        spec = structure(previous.spec, DeploymentSpec, what="version record", path="$")
        plan, load = plan_of(spec)
        return await self._swap(
            spec,
            plan,
            load,
            by=by,
            outcome="rolled_back",
            live_as=f"live (rolled back to version {previous.version})",
            counted=counted,
        )

    def _mark(self, version: int, outcome: str) -> None:
        for record in self.history:
            if record.version == version:
                record.outcome = outcome

    def _find(self, version: int) -> VersionRecord:
        return next(r for r in self.history if r.version == version)

    def _trim(self) -> None:
        """Keep the newest HISTORY versions, and always the live one and the canary."""
        keep = {self.live.version, *([self.canary.version] if self.canary else [])}
        extra = len(self.history) - HISTORY
        if extra > 0:
            dropped = [h for h in self.history if h.version not in keep][:extra]
            self.history = [h for h in self.history if h not in dropped]

    def _changed(self, outcome: str | None = None) -> None:
        if self._closing:  # being deleted: its record goes, nothing may write it again
            return
        if outcome is not None and self.metrics is not None:
            self.metrics.swap(self.name, outcome)
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("deployment %s: could not record its versions", self.name)

    async def _probe(self, new: ReplicaSet) -> None:
        """Every replica of ``new`` answers every probe prompt in time."""
        for replica in new.replicas:
            for probe in PROBES:
                try:
                    answer = await asyncio.wait_for(
                        replica.ask("generate", requests=unstructure([probe])), PROBE_TIMEOUT
                    )
                except TimeoutError:
                    raise PluginError(
                        f"replica {replica.label} did not answer a probe within {PROBE_TIMEOUT:g} s"
                    ) from None
                except GptstoreError as exc:
                    raise PluginError(f"replica {replica.label} failed a probe: {exc}") from None
                generations = answer.get("generations") or []
                if len(generations) != 1:
                    raise PluginError(f"replica {replica.label} answered a probe wrongly")

    async def _gate(self, new: ReplicaSet, gate: SwapGate) -> None:
        texts = list(gate.texts) or _heldout_texts()
        if not (self.live.info.logprobs and new.info.logprobs):
            raise InvalidInput(
                "gate",
                ["the perplexity gate needs log-probabilities from both versions' backends"],
            )

        async def perplexity(replicas: ReplicaSet) -> float:
            replica = choose(replicas.replicas)
            if replica is None:
                raise Unavailable(f"version {replicas.version} has no ready replica")
            answer = await asyncio.wait_for(replica.ask("logprobs", texts=texts), PROBE_TIMEOUT)
            values = [v for scored in answer["logprobs"] for v in scored["logprobs"][1:]]
            if not values:
                raise InvalidInput("gate", ["the gate's texts have no tokens to score"])
            return math.exp(-sum(values) / len(values))

        live, candidate = await asyncio.gather(perplexity(self.live), perplexity(new))
        ratio = candidate / live
        if not math.isfinite(ratio) or ratio > gate.max_perplexity_ratio:
            raise PluginError(
                f"gate failed: perplexity {candidate:.3f} against the live version's "
                f"{live:.3f} ({ratio:.3f}×, most allowed {gate.max_perplexity_ratio:g}×)"
            )

    # -- status ----------------------------------------------------------------------------

    def snapshots(self) -> list[DeploymentSnapshot]:
        """Per version, for the metrics: its replicas' states, and its calls in flight split
        as its replicas' batchers hold them (up to max_batch running each, the rest waiting)."""
        shots = []
        for replicas in [self.live, *([self.canary] if self.canary else [])]:
            states = replicas.states()
            running, waiting = replicas.split(replicas.spec.max_batch)
            shots.append(
                DeploymentSnapshot(self.name, replicas.version, dict(states), waiting, running)
            )
        return shots

    def status(self) -> DeploymentStatus:
        replicas = self.replicas
        ready = self.live.ready()
        live = self.live.describe()
        described = [*live, *(self.canary.describe() if self.canary else [])]
        states = ", ".join(f"{r['replica']} {r['state']}" for r in described)
        counts = {"batches": 0, "rows": 0, "largest": 0, "streams": 0}
        for replica in replicas:
            for key, value in replica.stats.items():
                if key in counts:
                    counts[key] = (
                        max(counts[key], value) if key == "largest" else counts[key] + value
                    )
        spec = self.spec
        canary = self.canary
        return {
            "name": self.name,
            "artifact": self.artifact.id,
            "backend": self.backend,
            "options": spec.options,
            "max_batch": spec.max_batch,
            "max_queue": spec.max_queue,
            "context_length": self.info.context_length,
            "logprobs": self.info.logprobs,
            "adapters": list(spec.adapters),
            "batches": counts,  # type: ignore[typeddict-item]
            "created_at": self.created_at.isoformat(),
            "health": {
                "ok": ready > 0,
                "message": f"{ready} of {len(live)} replicas ready ({states})",
            },
            "replicas": described,
            "version": self.version,
            "canary": (
                {"version": canary.version, "percent": round(self.canary_share * 100, 3)}
                if canary is not None
                else None
            ),
            "swap": dict(self.swap_state),
            "versions": [asdict(h) for h in self.history],  # type: ignore[misc]
        }

    async def aclose(self) -> None:
        """Stop sending calls, let those in flight finish, stop every replica."""
        self._closing = True
        sets = [self.live, *([self.canary] if self.canary else [])]
        if self._loading is not None:  # a swap's new version: its start fails, the swap ends
            sets.append(self._loading)
        await asyncio.gather(*(s.aclose() for s in sets))

    def close(self) -> None:
        """:meth:`aclose` from another thread than the event loop's."""
        asyncio.run_coroutine_threadsafe(self.aclose(), self.loop).result()

    def run(self, work: Awaitable[Any]) -> Any:
        """Run ``work`` on the deployment's event loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(_wrap(work), self.loop).result()


async def _wrap(work: Awaitable[Any]) -> Any:
    return await work


def _record(version: int, spec: DeploymentSpec, by: str, outcome: str) -> VersionRecord:
    return VersionRecord(
        version=version,
        artifact=spec.artifact,
        backend=spec.backend,
        options=dict(spec.options),
        replicas=spec.replicas,
        by=by,
        outcome=outcome,
        spec=unstructure(spec),
    )


def _heldout_texts() -> list[str]:
    from gptstore.optimization.data import default_heldout

    texts = [e for e in default_heldout(6000).examples if isinstance(e, str)]
    return [t[:1500] for t in texts[:4]]
