"""The store API: catalog search and selection with explanations, model cards, artifacts and
their lineage, deployments, and plugins with their status."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, cast

import anyio
import attrs
from attrs import Factory, field, frozen
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import FromPath, FromQuery, Parameter

from gptstore.artifacts import ARTIFACT_ID_PATTERN, ArtifactStore, check_artifact_id
from gptstore.catalog import Catalog, Entry
from gptstore.config import Store
from gptstore.converter import in_range, json_converter, structure, unstructure
from gptstore.deploy import Deployments
from gptstore.deploy.router import SwapGate
from gptstore.selection import make_scorer, select_models, selection_json
from gptstore.server.auth import changed_by
from gptstore.server.body import read_body
from gptstore.server.schema import (
    ArtifactWithLineage,
    Card,
    ManifestBody,
    PluginStatus,
    SearchResults,
    SelectionResult,
    errors,
    json_body,
)
from gptstore.serving.deployments import NAME_PATTERN, DeploymentSpec, DeploymentStatus
from gptstore.types import Requirement

#: Artifact ids as the store accepts them (no "..", no "/": an id never names a path outside).
ARTIFACT_ID = Annotated[str, Parameter(pattern=ARTIFACT_ID_PATTERN)]
DEPLOYMENT_NAME = Annotated[str, Parameter(pattern=NAME_PATTERN)]


@frozen(kw_only=True)
class DeploymentChange(DeploymentSpec):
    """The body of ``PUT /store/deployments/{name}``: the new version's spec, and how traffic
    moves to it: at once, or ``canary`` percent of calls until it is promoted or rolled back;
    ``gate`` compares its perplexity with the live version's before any traffic moves."""

    canary: float | None = field(default=None, validator=in_range(0, 100, open_low=True))
    gate: SwapGate | None = None

    def spec(self) -> DeploymentSpec:
        return DeploymentSpec(
            **{f.name: getattr(self, f.name) for f in attrs.fields(DeploymentSpec)}
        )


@frozen(kw_only=True)
class SelectBody:
    requirement: Requirement = Factory(Requirement)
    policy: str = "balanced"
    options: dict[str, Any] = Factory(dict)
    limit: int = field(default=10, validator=in_range(1, 1000))
    explain_excluded: int = field(default=20, validator=in_range(0, 1000))


def _entry(entry: Entry) -> Card:
    return cast(Card, {**unstructure(entry.card), "uid": entry.card.uid, "listed": entry.listed})


def catalog_of(state: State) -> Catalog:
    if not hasattr(state, "catalog"):
        store: Store = state.store
        state.catalog = Catalog(store.catalog_path)
    catalog: Catalog = state.catalog
    return catalog


class StoreController(Controller):
    path = "/store"
    opt: Mapping[str, Any] = MappingProxyType({"role": "user"})

    @get("/plugins", sync_to_thread=False, responses=errors(401))
    def plugins(self, state: State) -> list[PluginStatus]:
        return [unstructure(info) for info in state.manager.plugin_infos()]

    @get("/models", sync_to_thread=True, responses=errors(400, 401))
    def search(
        self,
        state: State,
        q: Annotated[
            str | None,
            Parameter(
                pattern=r"[^\W_]",
                description="Words that must each appear in the name, description or tags "
                "(as words or word prefixes)",
            ),
        ] = None,
        task: FromQuery[str | None] = None,
        source: FromQuery[str | None] = None,
        limit: Annotated[int, Parameter(ge=1, le=200)] = 20,
    ) -> SearchResults:
        requirement = structure(
            {"query": q, "task": task, "sources": [source] if source else []},
            Requirement,
            what="query",
        )
        entries, total = catalog_of(state).search(requirement, limit=limit)
        return {"total": total, "results": [_entry(e) for e in entries]}

    @get("/models/{uid:path}", sync_to_thread=True, responses=errors(401, 404))
    def card(self, state: State, uid: FromPath[str]) -> Card:
        return _entry(catalog_of(state).resolve(uid.lstrip("/")))

    @post(
        "/select",
        status_code=200,
        operation_class=json_body(SelectBody),
        responses=errors(400, 401, 404, 413),
    )
    async def select(self, state: State, request: Request[Any, Any, Any]) -> SelectionResult:
        body = await read_body(request, SelectBody)
        store: Store = state.store
        # config.toml is read per request, as each `gptstore select` reads it: both rank alike.
        name, scorer = make_scorer(state.manager, store.config(), body.policy, body.options)

        def run() -> SelectionResult:
            selection = select_models(
                catalog_of(state),
                scorer,
                body.requirement,
                policy=name,
                limit=body.limit,
                explain_excluded=body.explain_excluded,
            )
            return cast(SelectionResult, selection_json(selection))

        return await anyio.to_thread.run_sync(run)

    @get("/artifacts", sync_to_thread=True, responses=errors(401))
    def artifacts(self, state: State) -> list[ManifestBody]:
        store: Store = state.store
        return [unstructure(a.manifest) for a in ArtifactStore(store.artifacts_dir).list()]

    @get("/artifacts/{artifact_id:str}", sync_to_thread=True, responses=errors(400, 401, 404))
    def artifact(self, state: State, artifact_id: ARTIFACT_ID) -> ArtifactWithLineage:
        store: Store = state.store
        artifacts = ArtifactStore(store.artifacts_dir)
        artifact = artifacts.get(check_artifact_id(artifact_id))
        lineage = [unstructure(a.manifest) for a in artifacts.lineage(artifact)[1:]]
        return cast(ArtifactWithLineage, {**unstructure(artifact.manifest), "lineage": lineage})

    @get("/deployments", sync_to_thread=False, responses=errors(401))
    def deployments(self, state: State) -> list[DeploymentStatus]:
        deployments: Deployments = state.deployments
        return [d.status() for d in deployments.list()]

    @get("/deployments/{name:str}", sync_to_thread=False, responses=errors(400, 401, 404, 503))
    def deployment(self, state: State, name: DEPLOYMENT_NAME) -> DeploymentStatus:
        deployments: Deployments = state.deployments
        return deployments.get(name).status()

    @post(
        "/deployments",
        status_code=201,
        opt={"role": "admin"},
        operation_class=json_body(
            DeploymentSpec,
            extra={"name": Schema(type=OpenAPIType.STRING, pattern=NAME_PATTERN)},
        ),
        responses=errors(400, 401, 403, 404, 409, 413),
    )
    async def create(self, state: State, request: Request[Any, Any, Any]) -> DeploymentStatus:
        """A deployment from ``{"name": ..., **DeploymentSpec}``; 409 when the name is taken."""
        body = await read_body(request, dict[str, Any])
        name = structure(body.pop("name", None), str, what="request", path="$.name")
        spec = structure(body, DeploymentSpec, what="request", using=json_converter)
        deployments: Deployments = state.deployments
        by = changed_by(request)
        return await anyio.to_thread.run_sync(
            lambda: deployments.create(name, spec, persist=True, by=by).status()
        )

    @put(
        "/deployments/{name:str}",
        opt={"role": "admin"},
        operation_class=json_body(DeploymentChange),
        responses={
            **errors(400, 401, 403, 404, 409, 413, 422),
            201: ResponseSpec(
                data_container=DeploymentStatus,
                description="There was no such deployment: its version 1 is created",
                generate_examples=False,
            ),
        },
    )
    async def change(
        self, state: State, request: Request[Any, Any, Any], name: DEPLOYMENT_NAME
    ) -> Response[DeploymentStatus]:
        """Deploy a new version of ``name`` (or create it: 201): start its replicas, probe them,
        gate them when asked, then move traffic (at once, or a canary share) and stop the old
        version once its calls in flight are done. 422 when the new version fails: the live one
        still serves. Answers when the swap is done (or its canary runs)."""
        change = await read_body(request, DeploymentChange)
        deployments: Deployments = state.deployments
        by = changed_by(request)
        deployment, created = await anyio.to_thread.run_sync(
            lambda: deployments.swap(
                name, change.spec(), canary=change.canary, gate=change.gate, by=by
            )
        )
        return Response(deployment.status(), status_code=201 if created else 200)

    @post(
        "/deployments/{name:str}/rollback",
        status_code=200,
        opt={"role": "admin"},
        responses=errors(400, 401, 403, 404, 409, 422),
    )
    async def rollback(
        self, state: State, request: Request[Any, Any, Any], name: DEPLOYMENT_NAME
    ) -> DeploymentStatus:
        """Drop the canary, or return to the version live before this one."""
        return await _step(state, request, name, "rollback")

    @post(
        "/deployments/{name:str}/promote",
        status_code=200,
        opt={"role": "admin"},
        responses=errors(400, 401, 403, 404, 409),
    )
    async def promote(
        self, state: State, request: Request[Any, Any, Any], name: DEPLOYMENT_NAME
    ) -> DeploymentStatus:
        """Make the canary the live version."""
        return await _step(state, request, name, "promote")

    @delete(
        "/deployments/{name:str}",
        status_code=204,
        sync_to_thread=True,
        opt={"role": "admin"},
        responses=errors(400, 401, 403, 404),
    )
    def remove(self, state: State, name: DEPLOYMENT_NAME) -> None:
        deployments: Deployments = state.deployments
        deployments.delete(name)


async def _step(
    state: State, request: Request[Any, Any, Any], name: str, step: Literal["rollback", "promote"]
) -> DeploymentStatus:
    """Roll back or promote deployment ``name`` (off the event loop: it waits for replicas)."""
    deployments: Deployments = state.deployments
    by = changed_by(request)
    act = deployments.rollback if step == "rollback" else deployments.promote
    return await anyio.to_thread.run_sync(lambda: act(name, by=by).status())
