"""``create_app()``: the Litestar application, wired in one place.

Routes, the API-key guard and the error handlers are put together here; the work is elsewhere:
deployments in :mod:`gptstore.serving`, errors in :mod:`gptstore.server.errors`, keys in
:mod:`gptstore.server.auth`. The lifespan loads the configured deployments before the server
listens (a deployment that cannot load stops it, naming the cause) and unloads them at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.openapi import OpenAPIConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.routes import HTTPRoute
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from gptstore import __version__
from gptstore.artifacts import ArtifactStore
from gptstore.config import Store
from gptstore.deploy import Deployments
from gptstore.deploy.metrics import DeploymentSnapshot, Metrics
from gptstore.deploy.ray_engine import RayEngine
from gptstore.deploy.records import DeploymentRecords
from gptstore.errors import GptstoreError, InvalidInput, Unavailable
from gptstore.manager import PluginManager, make_plugin_manager
from gptstore.optimization.jobs import Jobs
from gptstore.server.auth import require_role
from gptstore.server.errors import EXCEPTION_HANDLERS
from gptstore.server.health import ROUTES as HEALTH_ROUTES
from gptstore.server.jobs_api import JobsController
from gptstore.server.metrics_api import ROUTES as METRICS_ROUTES
from gptstore.server.openai_api import OpenAIController
from gptstore.server.sessions import Sessions
from gptstore.server.settings import (
    SERVER_CONFIG_ENV,
    ServerConfig,
    plan_deployments,
    server_config,
)
from gptstore.server.store_api import StoreController
from gptstore.server.storefront import STATIC, TEMPLATES, Storefront, template_globals
from gptstore.serving.deployments import Plan

log = logging.getLogger("gptstore.server")

__all__ = ["SERVER_CONFIG_ENV", "create_app", "server_config"]


class _UserErrorTracebacks(logging.Filter):
    """Drops the traceback of a start-up failure that is a user's mistake (a GptstoreError, already
    logged as one line by the lifespan): Litestar hands uvicorn the formatted traceback of any
    start-up failure, and a typo in a config file deserves one line, not sixty."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Traceback" in message and "gptstore.errors." in message)


#: Installed once (the uvicorn logger outlives any one app).
_TRACEBACK_FILTER = _UserErrorTracebacks()


def load_deployments(
    config: ServerConfig, deployments: Deployments, plans: dict[str, Plan] | None = None
) -> None:
    """Load every configured deployment (``plans``: as :func:`plan_deployments` checked them);
    on a failure, unload what was loaded and raise an InvalidInput naming the deployment, the
    file and the cause."""
    records = deployments.records.load() if deployments.records is not None else {}
    for name, spec in config.deployments.items():
        if name in records:
            continue  # changed through the API since: its record says what it serves now
        try:
            deployments.create(
                name, spec, where=f"$.deployments.{name}", checked=(plans or {}).get(name)
            )
        except Exception as exc:
            deployments.close()
            if not isinstance(exc, GptstoreError):
                log.exception("deployment %s failed to load", name)
            cause = str(exc) if isinstance(exc, GptstoreError) else f"{type(exc).__name__}: {exc}"
            raise InvalidInput(
                f"[deployments.{name}] in {config.files['deployments']}",
                [f"failed to load: {cause}"],
            ) from None
    for name, record in records.items():
        try:
            deployments.restore(name, record)
        except Exception as exc:
            deployments.close()
            cause = str(exc) if isinstance(exc, GptstoreError) else f"{type(exc).__name__}: {exc}"
            raise InvalidInput(
                f"deployment {name!r} recorded in {deployments.records.folder}",  # type: ignore[union-attr]
                [
                    f"failed to load: {cause}; delete it through the API, or remove its record "
                    "file, to start without it"
                ],
            ) from None
        log.info("deployment %s: version %s, as recorded", name, record.get("version"))


class Drain:
    """Requests in flight, and whether the server drains (SIGTERM): a draining server answers
    503 to every new request but ``/health``, ``/ready`` and ``/metrics`` (``/ready`` says 503 at
    once), while the requests and streams in flight complete; ``gptstore serve`` exits when none
    is left (or its drain timeout has passed)."""

    #: Paths a draining server still answers as usual.
    OPEN = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0  # HTTP requests whose response has not been sent whole

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or scope["path"] in self.OPEN:
                await app(scope, receive, send)
                return
            self.inflight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.inflight -= 1

        return counted


async def _before_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    drain: Drain = request.app.state.drain
    if drain.draining and request.url.path not in Drain.OPEN:
        raise Unavailable("the server is shutting down; retry on another instance")
    return await _options(request)


async def _options(request: Request[Any, Any, Any]) -> Response[None] | None:
    """Answer OPTIONS with every method of the path. (Litestar's own OPTIONS handler lists the
    methods of the first handlers registered for a path, not all of them.)"""
    if request.method != "OPTIONS":
        return None
    template = request.scope.get("path_template")
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, HTTPRoute) and route.path_format == template
        for method in route.methods
    }
    return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods))})


def create_app(
    home: Path | None = None,
    *,
    manager: PluginManager | None = None,
    config: Path | None = None,
    engine: Literal["local", "ray"] | None = None,
    ray_address: str | None = None,
) -> Litestar:
    """The app for the store at ``home`` ($GPTSTORE_HOME by default).

    ``config`` (default: ``$GPTSTORE_SERVER_CONFIG`` when set) is a TOML file whose ``[server]``
    and ``[deployments]`` tables replace those of the store's config.toml. Bad settings, and
    deployments whose artifact, backend or options are wrong, raise InvalidInput here.
    ``engine`` and ``ray_address``, when given, replace ``[server] engine`` and ``[server.ray]
    address``.
    """
    store = Store(home)
    if config is None and os.environ.get(SERVER_CONFIG_ENV):
        config = Path(os.environ[SERVER_CONFIG_ENV])
    checked = server_config(store, config, engine=engine, ray_address=ray_address)
    plugins = manager or make_plugin_manager()
    artifacts = ArtifactStore(store.artifacts_dir)
    plans = plan_deployments(checked, plugins, artifacts)
    drain = Drain()
    metrics = Metrics(lambda: _snapshots(app))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        import anyio

        engine = None
        if checked.settings.engine == "ray":
            engine = RayEngine(checked.settings.ray)
        deployments = Deployments(
            plugins,
            artifacts,
            loop=asyncio.get_running_loop(),
            max_replicas=checked.settings.max_replicas,
            records=DeploymentRecords(store.deployments_dir),
            metrics=metrics,
            engine=engine,
        )
        try:
            if engine is not None:  # in a thread: Ray leaves the server's signal handlers be
                await anyio.to_thread.run_sync(engine.connect)
            await anyio.to_thread.run_sync(load_deployments, checked, deployments, plans)
        except GptstoreError as exc:
            log.error("gptstore serve cannot start: %s", exc)
            logging.getLogger("uvicorn.error").addFilter(_TRACEBACK_FILTER)  # once: a set
            if engine is not None:
                await anyio.to_thread.run_sync(deployments.close)
                await anyio.to_thread.run_sync(engine.close)
            raise
        app.state.deployments = deployments
        app.state.jobs = Jobs(
            plugins,
            artifacts,
            jobs_dir=store.jobs_dir,
            data_dir=store.data_dir,
            recipes_dir=store.recipes_dir,
            max_running=checked.settings.max_jobs,
        )
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(app.state.jobs.close)
            await anyio.to_thread.run_sync(deployments.close)
            if engine is not None:
                await anyio.to_thread.run_sync(engine.close)

    app = Litestar(
        route_handlers=[
            *HEALTH_ROUTES,
            *METRICS_ROUTES,
            OpenAIController,
            StoreController,
            JobsController,
            Storefront,
            create_static_files_router(path="/static", directories=[STATIC], name="static"),
        ],
        template_config=TemplateConfig(
            directory=TEMPLATES,
            engine=JinjaTemplateEngine,
            engine_callback=lambda engine: engine.engine.globals.update(template_globals()),
        ),
        lifespan=[lifespan],
        guards=[require_role],
        before_request=_before_request,
        middleware=[drain.middleware],
        state=State(
            {
                "settings": checked.settings,
                "store": store,
                "manager": plugins,
                "drain": drain,
                "metrics": metrics,
                "sessions": Sessions(),
            }
        ),
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=checked.settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="gptstore", version=__version__),
    )
    return app


def _snapshots(app: Litestar) -> list[DeploymentSnapshot]:
    """The deployments' states for a scrape of /metrics (none before they are loaded)."""
    deployments: Deployments | None = getattr(app.state, "deployments", None)
    return deployments.snapshots() if deployments is not None else []
