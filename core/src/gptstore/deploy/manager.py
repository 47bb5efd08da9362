"""The deployment manager: named deployments, each served in-process or by replica processes.

:class:`Deployments` creates, lists and deletes them, and knows which are loading or being
deleted. A deployment with ``isolation = "none"`` is a
:class:`~gptstore.serving.deployments.Deployment` in the server's process; one with ``isolation =
"process"`` (the default) is a :class:`~gptstore.deploy.router.ReplicatedDeployment`, whose
replicas are worker processes (:mod:`gptstore.deploy.replica`). The HTTP layer talks to both
the same way.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from attrs import asdict

from gptstore.artifacts import ArtifactStore
from gptstore.converter import structure, unstructure
from gptstore.deploy.metrics import DeploymentSnapshot, Metrics, status_of
from gptstore.deploy.ray_engine import RayEngine
from gptstore.deploy.records import DeploymentRecords
from gptstore.deploy.router import ReplicaSet, ReplicatedDeployment, SwapGate, VersionRecord
from gptstore.errors import Conflict, InvalidInput, NotFound, Unavailable, UnknownName
from gptstore.manager import PluginManager
from gptstore.records import ServingBackend
from gptstore.serving.deployments import (
    Deployment,
    DeploymentSpec,
    Plan,
    check_engine,
    check_name,
    load_runner,
    plan,
)

#: The most replicas (model copies, in-process ones included) a server runs by default, over all
#: its deployments: a bound on what one admin request can make the host load.
MAX_REPLICAS = 16

#: A deployment as the HTTP layer sees it: in the server's process, or behind replicas.
Served = Deployment | ReplicatedDeployment


class Deployments:
    """The deployments of one server process (thread-safe), and which are loading."""

    def __init__(
        self,
        manager: PluginManager,
        artifacts: ArtifactStore,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_replicas: int = MAX_REPLICAS,
        records: DeploymentRecords | None = None,
        metrics: Metrics | None = None,
        engine: RayEngine | None = None,
    ) -> None:
        self.manager = manager
        #: Where replicas run: None, processes on this host; else a Ray cluster.
        self.engine = engine
        self.artifacts = artifacts
        #: Where replicated deployments count their calls and swaps (None: nowhere).
        self.metrics = metrics
        #: Where deployments created or changed through the API are kept (None: nowhere).
        self.records = records
        #: The server's event loop: replicated deployments live on it (None: in-process only).
        self.loop = loop
        self._items: dict[str, Served] = {}
        #: Deployments being deleted: their replicas count until they have stopped.
        self._leaving: dict[str, Served] = {}
        #: Replicas (model copies) loading, per deployment: reserved against ``max_replicas``
        #: until they serve (then their deployment counts them) or have failed.
        self._reserved = Counter[str]()
        self.max_replicas = max_replicas
        #: Names taken by a deployment that is not serving: "loading" or "being deleted".
        self._pending: dict[str, str] = {}
        self._closed = False
        self._lock = threading.Lock()

    def plan(self, name: str, spec: DeploymentSpec, *, where: str = "$") -> Plan:
        """Check ``spec`` as deployment ``name`` (its problems named under ``where``)."""
        check_name(name)
        check_engine(name, spec, "local" if self.engine is None else "ray", where)
        if spec.isolation == "none" and spec.replicas != 1:
            raise InvalidInput(
                f"deployment {name!r}",
                [
                    f'isolation = "none" runs one copy of the model in the server\'s process, '
                    f'not {spec.replicas}: set replicas = 1, or isolation = "process" '
                    f"@ {where}.replicas"
                ],
            )
        # What a request names in its body and the store lacks is a bad request (400): the
        # deployment the path names may well exist.
        try:
            self.artifacts.get(spec.artifact)
        except NotFound as exc:
            raise InvalidInput(f"deployment {name!r}", [f"{exc} @ {where}.artifact"]) from None
        try:
            return plan(
                self.manager,
                self.artifacts,
                spec.artifact,
                spec.backend,
                spec.options,
                adapters=spec.adapters,
                where=f"{where}.options",
                adapters_where=f"{where}.adapters",
            )
        except UnknownName as exc:
            raise InvalidInput(f"deployment {name!r}", [f"{exc} @ {where}.backend"]) from None

    def create(
        self,
        name: str,
        spec: DeploymentSpec,
        *,
        where: str = "$",
        checked: Plan | None = None,
        persist: bool = False,
        by: str = "config",
        history: Sequence[VersionRecord] = (),
        version: int | None = None,
    ) -> Served:
        """Load ``spec`` as deployment ``name`` (``checked``: its plan, when already made);
        Conflict when the name is taken, Unavailable once :meth:`close` has begun.
        ``persist``: keep it in the store's records (a deployment made through the API);
        ``history``: the versions it had before, and ``version`` the live one's number
        (restored from its record)."""
        checked = checked or self.plan(name, spec, where=where)
        with self._lock:
            self._check_open()
            if self._pending.get(name) == "being deleted":  # gone in a moment: retry
                raise Unavailable(f"deployment {name!r} is being deleted; retry shortly")
            if name in self._items or name in self._pending:
                raise Conflict(f"deployment {name!r} already exists; delete it first")
            self._check_model_names(name, spec)
            self._reserve(name, spec.most_replicas(), f"deployment {name!r} asks for")
            self._pending[name] = "loading"
        try:
            deployment = self._load(name, spec, checked, by=by, history=history, version=version)
            if persist and isinstance(deployment, ReplicatedDeployment):
                deployment.on_change = self._persist
                self._persist(deployment)
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
                self._reserved[name] -= spec.most_replicas()  # counted as a deployment from now on
        return deployment

    def _running(self) -> int:
        """Replica processes (in-process copies too) the server runs or is loading; under the
        lock."""
        deployments = [*self._items.values(), *self._leaving.values()]
        return sum(
            d.processes() if isinstance(d, ReplicatedDeployment) else 1 for d in deployments
        ) + sum(self._reserved.values())

    def _reserve(self, name: str, count: int, asking: str) -> None:
        """Hold ``count`` more replicas for ``name`` against max_replicas (under the lock), or
        Conflict; the caller gives them back by subtracting from ``_reserved``."""
        running = self._running()
        if running + count > self.max_replicas:
            raise Conflict(
                f"{asking} {count} replica(s), and the server already runs or loads {running} "
                f"of its {self.max_replicas} (max_replicas); delete a deployment or ask for fewer"
            )
        self._reserved[name] += count

    def _reservation(self, name: str, count: int, asking: str) -> Callable[[], None]:
        """Hold ``count`` more replicas for ``name`` (Conflict when over max_replicas); the
        function that gives them back, once, from any thread: call it when the deployment
        counts them itself (its new version is live), or when the change has failed."""
        with self._lock:
            self._reserve(name, count, asking)
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            with self._lock:
                if not given_back:
                    given_back = True
                    self._reserved[name] -= count

        return give_back

    def _load(
        self,
        name: str,
        spec: DeploymentSpec,
        checked: Plan,
        *,
        by: str = "config",
        history: Sequence[VersionRecord] = (),
        version: int | None = None,
    ) -> Served:
        if spec.isolation == "process":
            if self.loop is None:
                raise Unavailable("replica processes need the server's event loop")
            replicated = ReplicatedDeployment(
                name,
                spec,
                checked,
                self.load_message(name, spec, checked),
                self.loop,
                history=history,
                by=by,
                version=version,
                sets=self.engine.replica_set if self.engine is not None else ReplicaSet,
            )
            replicated.metrics = self.metrics
            asyncio.run_coroutine_threadsafe(replicated.start(), self.loop).result()
            return replicated
        runner = load_runner(checked)
        try:
            local = Deployment(name, spec, checked, runner)
        except BaseException:
            runner.close()
            raise
        metrics = self.metrics
        if metrics is not None:

            def observe(error: BaseException | None, **figures: Any) -> None:
                if error is not None:  # latencies of answered requests only
                    figures = {"generation_tokens": figures.get("generation_tokens", 0)}
                metrics.request(name, 1, 200 if error is None else status_of(error), **figures)

            local.observe = observe
        return local

    def load_message(self, name: str, spec: DeploymentSpec, checked: Plan) -> dict[str, Any]:
        """What a replica process needs to load ``spec``: the plugin of its backend, imported
        by module in the replica, and the store's artifacts."""
        info = self.manager.providers(ServingBackend)[checked.backend.name]
        plugin = None
        if not info.builtin:
            if not info.module:
                raise InvalidInput(
                    f"deployment {name!r}",
                    [
                        f"backend {checked.backend.name!r} comes from plugin {info.name!r}, "
                        "registered in this process as an object, which a replica process "
                        'cannot import; register a module, or set isolation = "none"'
                    ],
                )
            plugin = {"name": info.name, "module": info.module}
        return {
            "op": "load",
            "name": name,
            "artifacts": str(self.artifacts.root),
            "plugin": plugin,
            "spec": unstructure(spec),
        }

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")

    def loading(self) -> list[str]:
        with self._lock:
            return sorted(n for n, state in self._pending.items() if state == "loading")

    def _check_model_names(self, name: str, spec: DeploymentSpec) -> None:
        """Conflict when ``spec`` as deployment ``name`` would serve a model name another
        deployment serves (call with the lock held)."""
        taken = self._model_names()
        for model in (name, *spec.adapters):
            if model in taken and taken[model] != name:
                raise Conflict(
                    f"model name {model!r} is served by deployment {taken[model]!r} "
                    "(adapters are models of their own)"
                )

    def _model_names(self) -> dict[str, str]:
        """Every model name served, to the deployment serving it (call with the lock held)."""
        names = {name: name for name in self._items}
        for name, deployment in self._items.items():
            names.update(dict.fromkeys(deployment.spec.adapters, name))
        return names

    def resolve(self, model: str) -> tuple[Served, str | None]:
        """The deployment serving OpenAI model name ``model``, and the adapter it names (None:
        the deployment's own model)."""
        with self._lock:
            owner = self._model_names().get(model)
        if owner is None or owner == model:
            return self.get(model), None
        return self.get(owner), model

    def get(self, name: str) -> Served:
        with self._lock:
            deployment = self._items.get(name)
            state = self._pending.get(name)
            names = sorted(self._items)
        if deployment is None:
            if state is not None:
                raise Unavailable(f"deployment {name!r} is {state}; retry shortly")
            raise NotFound(f"no deployment {name!r}; deployed: {', '.join(names) or 'none'}")
        return deployment

    def list(self) -> list[Served]:
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
            self._leaving[name] = self._items.pop(name)
        try:
            deployment.close()
            if self.records is not None:
                self.records.remove(name)
        finally:
            with self._lock:
                self._pending.pop(name, None)
                self._leaving.pop(name, None)

    # -- versions ----------------------------------------------------------------------------

    def _replicated(self, name: str) -> ReplicatedDeployment:
        deployment = self.get(name)
        if not isinstance(deployment, ReplicatedDeployment):
            raise Conflict(
                f'deployment {name!r} runs in the server\'s process (isolation = "none"); '
                'versions, swaps and rollbacks need isolation = "process"'
            )
        return deployment

    def swap(
        self,
        name: str,
        spec: DeploymentSpec,
        *,
        canary: float | None = None,
        gate: SwapGate | None = None,
        by: str = "config",
        where: str = "$",
    ) -> tuple[Served, bool]:
        """Deploy ``spec`` as the next version of ``name`` (see
        :meth:`ReplicatedDeployment.swap`), or as its first when there is no such deployment;
        (the deployment, whether it was created). Either way it is kept in the store's records.
        """
        checked = self.plan(name, spec, where=where)
        with self._lock:
            exists = name in self._items
        if not exists:
            if canary is not None:
                raise InvalidInput(
                    "request",
                    [
                        f"deployment {name!r} does not exist: there is nothing to canary "
                        "against @ $.canary"
                    ],
                )
            return self.create(name, spec, checked=checked, persist=True, by=by), True
        deployment = self._replicated(name)
        with self._lock:
            self._check_model_names(name, spec)
        if spec.isolation != "process":
            raise InvalidInput(
                "request",
                ['a new version runs in replica processes: isolation = "process" @ $.isolation'],
            )
        load = self.load_message(name, spec, checked)
        # Given back as soon as the new version counts in the deployment's processes() (not
        # when the old one has drained, up to DRAIN_TIMEOUT later: it would count twice).
        counted = self._reservation(
            name, spec.most_replicas(), f"the new version of {name!r} asks for"
        )
        try:
            swap = deployment.swap(
                spec, checked, load, canary=canary, gate=gate, by=by, counted=counted
            )
            self._change(deployment, swap)
        finally:
            counted()
        return deployment, False

    def promote(self, name: str, *, by: str = "config") -> Served:
        """Make the canary of ``name`` its live version."""
        deployment = self._replicated(name)
        self._change(deployment, deployment.promote(by=by))
        return deployment

    def rollback(self, name: str, *, by: str = "config") -> Served:
        """Drop the canary of ``name``, or go back to the version live before this one."""
        deployment = self._replicated(name)
        reservations: list[Callable[[], None]] = []

        def plan_of(spec: DeploymentSpec) -> tuple[Plan, dict[str, Any]]:
            # Going back to an earlier version starts its replicas again: reserved here, on
            # the event loop, under the swap lock, and given back once that version is live
            # (or the rollback failed).
            checked = self.plan(name, spec)
            load = self.load_message(name, spec, checked)
            reservations.append(
                self._reservation(name, spec.most_replicas(), f"rolling {name!r} back starts")
            )
            return checked, load

        def counted() -> None:
            for give_back in reservations:
                give_back()

        try:
            self._change(deployment, deployment.rollback(plan_of, by=by, counted=counted))
        finally:
            counted()
        return deployment

    def _change(self, deployment: ReplicatedDeployment, work: Awaitable[Any]) -> None:
        """Run a change of versions on the deployment's event loop; its record follows every
        step."""
        deployment.on_change = self._persist
        deployment.run(work)

    def snapshots(self) -> builtins.list[DeploymentSnapshot]:
        """Every deployment version as the metrics show it (read on the event loop)."""
        shots: builtins.list[DeploymentSnapshot] = []
        for deployment in self.list():
            if isinstance(deployment, ReplicatedDeployment):
                shots.extend(deployment.snapshots())
                continue
            held, most = deployment.batcher.accepted, deployment.spec.max_batch
            ok = deployment.status()["health"]["ok"]
            shots.append(
                DeploymentSnapshot(
                    deployment.name,
                    1,
                    {"ready" if ok else "dead": 1},
                    max(held - most, 0),
                    min(held, most),
                )
            )
        return shots

    def _persist(self, deployment: ReplicatedDeployment) -> None:
        if self.records is None:
            return
        self.records.save(
            deployment.name,
            {
                "name": deployment.name,
                "version": deployment.version,
                "spec": unstructure(deployment.spec),
                "history": [asdict(h) for h in deployment.history],
            },
        )

    def restore(self, name: str, record: dict[str, Any], *, where: str = "$") -> Served:
        """The deployment a record describes, at its live version, with its history (a canary
        it had is dropped: it was not promoted before the server stopped)."""
        spec = structure(
            record.get("spec"), DeploymentSpec, what=f"deployment record {name!r}", path="$.spec"
        )
        history = structure(
            record.get("history", []),
            list[VersionRecord],
            what=f"deployment record {name!r}",
            path="$.history",
        )
        version = int(record.get("version", 0))
        for entry in history:
            if entry.outcome == "canary" and entry.version != version:
                entry.outcome = "rolled back (the server restarted)"
        live = next((h for h in history if h.version == version), None)
        return self.create(
            name,
            spec,
            where=where,
            persist=True,
            by=live.by if live is not None else "config",
            history=history,
            version=version or None,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            items, self._items = list(self._items.values()), {}
        for deployment in items:
            deployment.close()
