"""``/health`` (the process answers) and ``/ready`` (the configured deployments are loaded, and the
server is not draining after SIGTERM), for GET and HEAD. ``gptstore serve`` loads the
deployments before it listens, so ``/ready`` answers 200 from the first request on until a
drain; it lists the deployments the store API is loading meanwhile, and each deployment's live
version and how many of its replicas are in each state (ready, starting, dead, draining)."""

from __future__ import annotations

from collections import Counter

from litestar import Response, get, head
from litestar.datastructures import State

from gptstore.deploy import Deployments
from gptstore.server.schema import DeploymentReadiness, Readiness, Status, errors


@get("/health", sync_to_thread=False, responses=errors())
def health() -> Status:
    return {"status": "ok"}


@head("/health", sync_to_thread=False, responses=errors())
def health_head() -> None:
    return None


def _readiness(state: State) -> tuple[bool, Readiness]:
    deployments: Deployments | None = getattr(state, "deployments", None)
    draining = bool(getattr(getattr(state, "drain", None), "draining", False))
    ready = deployments is not None and not draining
    loading = deployments.loading() if deployments is not None else []
    served: dict[str, DeploymentReadiness] = {}
    for deployment in deployments.list() if deployments is not None else []:
        status = deployment.status()
        states = Counter(r["state"] for r in status["replicas"])
        served[deployment.name] = {"version": status["version"], "replicas": dict(states)}
    return ready, {
        "ready": ready,
        "loading": loading,
        "draining": draining,
        "deployments": served,
    }


@get("/ready", sync_to_thread=False, responses=errors(503))
def ready(state: State) -> Response[Readiness]:
    ok, body = _readiness(state)
    return Response(body, status_code=200 if ok else 503)


@head("/ready", sync_to_thread=False, responses=errors(503))
def ready_head(state: State) -> Response[None]:
    ok, _body = _readiness(state)
    return Response(None, status_code=200 if ok else 503)


ROUTES = [health, health_head, ready, ready_head]
