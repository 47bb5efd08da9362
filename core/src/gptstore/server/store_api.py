"""The store API: catalog search and selection with explanations, model cards, artifacts and
their lineage, deployments, and plugins with their status."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from attrs import Factory, frozen
from litestar import Controller, delete, get, post
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery, JSONBody

from gptstore.artifacts import ArtifactStore, check_artifact_id
from gptstore.catalog import Catalog, Entry
from gptstore.config import Store
from gptstore.converter import structure, unstructure
from gptstore.selection import make_scorer, select_models, selection_json
from gptstore.serving.deployments import DeploymentSpec
from gptstore.types import Requirement


@frozen(kw_only=True)
class SelectBody:
    requirement: Requirement = Factory(Requirement)
    policy: str = "balanced"
    options: dict[str, Any] = Factory(dict)
    limit: int = 10
    explain_excluded: int = 20


def _entry(entry: Entry) -> dict[str, Any]:
    return {**unstructure(entry.card), "uid": entry.card.uid, "listed": entry.listed}


def _catalog(state: State) -> Catalog:
    if not hasattr(state, "catalog"):
        store: Store = state.store
        state.catalog = Catalog(store.catalog_path)
    catalog: Catalog = state.catalog
    return catalog


class StoreController(Controller):
    path = "/store"
    opt: Mapping[str, Any] = MappingProxyType({"role": "user"})

    @get("/plugins", sync_to_thread=False)
    def plugins(self, state: State) -> list[dict[str, Any]]:
        return [unstructure(info) for info in state.manager.plugin_infos()]

    @get("/models", sync_to_thread=True)
    def search(
        self,
        state: State,
        q: FromQuery[str | None] = None,
        task: FromQuery[str | None] = None,
        source: FromQuery[str | None] = None,
        limit: FromQuery[int] = 20,
    ) -> dict[str, Any]:
        requirement = structure(
            {"query": q, "task": task, "sources": [source] if source else []},
            Requirement,
            what="query",
        )
        entries, total = _catalog(state).search(requirement, limit=max(1, min(limit, 200)))
        return {"total": total, "results": [_entry(e) for e in entries]}

    @get("/models/{uid:path}", sync_to_thread=True)
    def card(self, state: State, uid: FromPath[str]) -> dict[str, Any]:
        return _entry(_catalog(state).resolve(uid.lstrip("/")))

    @post("/select", status_code=200, sync_to_thread=True)
    def select(self, state: State, data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        body = structure(data, SelectBody, what="request")
        store: Store = state.store
        # config.toml is read per request, as each `gptstore select` reads it: both rank alike.
        name, scorer = make_scorer(state.manager, store.config(), body.policy, body.options)
        selection = select_models(
            _catalog(state),
            scorer,
            body.requirement,
            policy=name,
            limit=max(1, body.limit),
            explain_excluded=max(0, body.explain_excluded),
        )
        return selection_json(selection)

    @get("/artifacts", sync_to_thread=True)
    def artifacts(self, state: State) -> list[dict[str, Any]]:
        store: Store = state.store
        return [unstructure(a.manifest) for a in ArtifactStore(store.artifacts_dir).list()]

    @get("/artifacts/{artifact_id:str}", sync_to_thread=True)
    def artifact(self, state: State, artifact_id: FromPath[str]) -> dict[str, Any]:
        store: Store = state.store
        artifacts = ArtifactStore(store.artifacts_dir)
        artifact = artifacts.get(check_artifact_id(artifact_id))
        lineage = [unstructure(a.manifest) for a in artifacts.lineage(artifact)[1:]]
        return {**unstructure(artifact.manifest), "lineage": lineage}

    @get("/deployments", sync_to_thread=False)
    def deployments(self, state: State) -> list[dict[str, Any]]:
        return [d.status() for d in state.deployments.list()]

    @get("/deployments/{name:str}", sync_to_thread=False)
    def deployment(self, state: State, name: FromPath[str]) -> dict[str, Any]:
        return state.deployments.get(name).status()  # type: ignore[no-any-return]

    @post("/deployments", status_code=201, sync_to_thread=True, opt={"role": "admin"})
    def create(self, state: State, data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        """A deployment from ``{"name": ..., **DeploymentSpec}``; 409 when the name is taken."""
        body = dict(data)
        name = structure(body.pop("name", None), str, what="request", path="$.name")
        spec = structure(body, DeploymentSpec, what="request")
        return state.deployments.create(name, spec).status()  # type: ignore[no-any-return]

    @delete("/deployments/{name:str}", status_code=204, sync_to_thread=True, opt={"role": "admin"})
    def remove(self, state: State, name: FromPath[str]) -> None:
        state.deployments.delete(name)
