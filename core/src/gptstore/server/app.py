"""``create_app()``: the Litestar application, wired in one place.

A lifespan loads the plugin manager and the configured deployments at start-up and closes the
runners at shutdown. Errors of every route come back in OpenAI's error shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from gptstore import __version__
from gptstore.artifacts import ArtifactStore
from gptstore.config import Store, read_toml
from gptstore.converter import structure
from gptstore.errors import (
    GptstoreError,
    InvalidInput,
    NotFound,
    RefusedModel,
    Unavailable,
    UnknownName,
)
from gptstore.manager import PluginManager, make_plugin_manager
from gptstore.server.batching import Overloaded
from gptstore.server.deployments import Deployments, check_limits
from gptstore.server.openai_api import OpenAIController
from gptstore.server.settings import DeploymentSpec, ServerSettings
from gptstore.server.store_api import StoreController

log = logging.getLogger("gptstore.server")


def _error(status: int, message: str, kind: str, code: str | None = None) -> Response[Any]:
    return Response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def _gptstore_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if isinstance(exc, Overloaded):
        response = _error(429, str(exc), "rate_limit_error", "overloaded")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, Unavailable):
        return _error(503, str(exc), "service_unavailable", "unavailable")
    if isinstance(exc, NotFound | UnknownName):
        return _error(404, str(exc), "invalid_request_error", "not_found")
    if isinstance(exc, InvalidInput | RefusedModel):
        return _error(400, str(exc), "invalid_request_error")
    return _error(400, str(exc), "invalid_request_error")


def _http_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, HTTPException)
    kind = {401: "authentication_error", 403: "permission_error"}.get(
        exc.status_code, "invalid_request_error"
    )
    message = exc.detail
    extra = getattr(exc, "extra", None)
    if exc.status_code == 400 and extra:
        message = f"{exc.detail}: {extra}"
    return _error(exc.status_code, message, kind)


def _server_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected error", exc_info=exc)
    return _error(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


async def require_role(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard: routes say ``opt={"role": "user" | "admin" | None}``; keys come from
    ``Authorization: Bearer KEY``. (Async and reading the raw headers: it runs on every
    inference request, where a sync guard would cost a worker-thread hop.)"""
    needed = handler.opt.get("role")
    if needed is None:
        return
    settings: ServerSettings = connection.app.state.settings
    header = next((v for k, v in connection.scope["headers"] if k == b"authorization"), b"")
    key = header[7:].strip().decode("latin-1") if header[:7].lower() == b"bearer " else ""
    if not key:
        if needed == "user" and settings.anonymous_inference:
            return
        raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
    role = settings.roles.get(key)
    if role is None:
        raise NotAuthorizedException("invalid API key")
    if needed == "admin" and role != "admin":
        raise PermissionDeniedException("this endpoint changes state and needs an admin key")


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", sync_to_thread=False)
def ready(state: State) -> Response[dict[str, Any]]:
    loading = state.loading
    failed = state.failed
    ok = not loading and not failed
    return Response(
        {"ready": ok, "loading": sorted(loading), "failed": failed}, status_code=200 if ok else 503
    )


SERVER_CONFIG_ENV = "GPTSTORE_SERVER_CONFIG"


def server_config(
    store: Store, config: Path | None = None
) -> tuple[ServerSettings, dict[str, DeploymentSpec]]:
    """``[server]`` and ``[deployments]``: from ``config`` (a TOML file) where it has them, else
    from the store's config.toml."""
    raw = store.read_raw_config()
    where = {"server": str(store.config_path), "deployments": str(store.config_path)}
    if config is not None:
        extra = read_toml(config)
        unknown = sorted(set(extra) - {"server", "deployments"})
        if unknown:
            raise InvalidInput(
                str(config),
                [
                    f"unknown table(s) {', '.join(unknown)}; a server config has [server] and "
                    "[deployments.NAME]"
                ],
            )
        for table in ("server", "deployments"):
            if table in extra:
                raw[table], where[table] = extra[table], str(config)
    settings = structure(
        raw.get("server", {}),
        ServerSettings,
        what=f"[server] in {where['server']}",
        path="$.server",
    )
    specs = structure(
        raw.get("deployments", {}),
        dict[str, DeploymentSpec],
        what=f"[deployments] in {where['deployments']}",
        path="$.deployments",
    )
    for name, spec in specs.items():
        check_limits(name, spec.max_batch, spec.max_queue)
    return settings, specs


def create_app(
    home: Path | None = None, *, manager: PluginManager | None = None, config: Path | None = None
) -> Litestar:
    """The app for the store at ``home`` ($GPTSTORE_HOME by default).

    ``config`` (default: ``$GPTSTORE_SERVER_CONFIG`` when set) is a TOML file whose ``[server]``
    and ``[deployments]`` tables replace those of the store's config.toml.
    """
    store = Store(home)
    if config is None and os.environ.get(SERVER_CONFIG_ENV):
        config = Path(os.environ[SERVER_CONFIG_ENV])
    settings, specs = server_config(store, config)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        import anyio

        plugins = manager or make_plugin_manager()
        deployments = Deployments(plugins, ArtifactStore(store.artifacts_dir))
        app.state.manager = plugins
        app.state.deployments = deployments
        app.state.loading = set(specs)
        app.state.failed = {}

        def load_all() -> None:
            for name, spec in specs.items():
                try:
                    deployments.create(
                        name,
                        spec.artifact,
                        spec.backend,
                        spec.options,
                        max_batch=spec.max_batch,
                        max_queue=spec.max_queue,
                    )
                except Exception as exc:  # the server stays up; /ready says what failed
                    log.exception("deployment %s failed to load", name)
                    app.state.failed[name] = str(exc)
                finally:
                    app.state.loading.discard(name)

        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, load_all)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
        deployments.close()

    return Litestar(
        route_handlers=[health, ready, OpenAIController, StoreController],
        lifespan=[lifespan],
        guards=[require_role],
        state=State({"settings": settings, "store": store}),
        exception_handlers={
            GptstoreError: _gptstore_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="gptstore", version=__version__),
    )
