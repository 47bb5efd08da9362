"""The storefront: the store as web pages, served by the same app at ``/``.

Pages are rendered on the server (Jinja templates in ``templates/``, a stylesheet and one small
script in ``static/``, shipped inside the package: no build step), so every page reads without
JavaScript; the script only adds what needs it (tokens streaming into the chat, a job's progress
as it happens). A person signs in once with an API key (:mod:`gptstore.server.sessions`: a
session cookie, never the key itself); admin keys also see the forms that change state (deploy,
swap, promote, roll back, delete; start and cancel jobs), each with the session's CSRF token.
Handlers call the same services as the store API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from gptstore import __version__
from gptstore.artifacts import ArtifactStore, tree_of
from gptstore.config import Store
from gptstore.converter import structure
from gptstore.deploy import Deployments
from gptstore.deploy.metrics import Metrics
from gptstore.deploy.router import ReplicatedDeployment
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.optimization.jobs import JobRequest, Jobs
from gptstore.optimization.training import LOG_FILE
from gptstore.records import OptimizationStrategy, ScoringPolicy, ServingBackend
from gptstore.selection import make_scorer, select_models
from gptstore.server.auth import changed_by, refreshing, session_of
from gptstore.server.charts import bar_chart, line_chart
from gptstore.server.errors import gptstore_error, http_error
from gptstore.server.sessions import COOKIE, Session, Sessions, csrf_ok
from gptstore.server.settings import ServerSettings
from gptstore.server.store_api import catalog_of
from gptstore.serving.deployments import DeploymentSpec
from gptstore.types import ChatMessage, GenerationRequest, Requirement
from gptstore.units import format_bytes, format_count, parse_count

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
#: A training step's loss in a progress message (``step 3/60 loss 2.913 eta 41s``).
_LOSS = re.compile(r"step (\d+)/\d+ loss (\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


class SignInRequired(Exception):
    """A page asked for without a session (or an admin page with a user's)."""

    def __init__(self, admin: bool = False) -> None:
        super().__init__("sign in")
        self.admin = admin


def _viewer(request: Request[Any, Any, Any], *, admin: bool = False) -> Session:
    session = session_of(request)
    if session is None or (admin and session.role != "admin"):
        raise SignInRequired(admin)
    return session


def _page(
    request: Request[Any, Any, Any], name: str, status: int = 200, **context: Any
) -> Template:
    session = session_of(request)
    return Template(
        template_name=name,
        context={
            "viewer": session,
            "admin": session is not None and session.role == "admin",
            "csrf": session.csrf if session is not None else "",
            "path": request.url.path,
            "version": __version__,
            **context,
        },
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _local(target: str | None) -> str:
    """A redirect target from a form: a path on this site, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def _form(request: Request[Any, Any, Any], *, admin: bool = True) -> dict[str, str]:
    """The posted form of a signed-in (admin) viewer, its CSRF token checked."""
    session = _viewer(request, admin=admin)
    form = await request.form()
    fields = {k: str(v) for k, v in form.items()}
    if not csrf_ok(session, fields.get("csrf")):
        raise HTTPException(status_code=403, detail="the form's CSRF token is missing or stale")
    return fields


def _done(request: Request[Any, Any, Any], path: str, message: str) -> Redirect:
    """To ``path``, where the session's next page shows ``message`` once (kept in the session,
    not the URL: a link cannot make the store say what it did not do)."""
    session = session_of(request)
    if session is not None:
        session.notice = message
    return Redirect(path, status_code=303)


def _notice(request: Request[Any, Any, Any]) -> str | None:
    """The notice an action left for this page (shown once)."""
    session = session_of(request)
    if session is None or refreshing(request):
        return None
    notice, session.notice = session.notice, None
    return notice


def _requirement(params: Mapping[str, str]) -> Requirement:
    """A requirement from a page's form fields (empty ones left out)."""
    data: dict[str, Any] = {"query": params.get("q") or None}
    if params.get("task"):
        data["task"] = params["task"]
    if params.get("source"):
        data["sources"] = [params["source"]]
    if params.get("license"):
        data["licenses"] = [params["license"]]
    if params.get("language"):
        data["languages"] = [params["language"]]
    for name in ("max_params", "min_params"):
        if params.get(name):
            data[name] = parse_count(params[name], name.replace("_", " "))
    if params.get("min_context"):
        data["min_context"] = parse_count(params["min_context"], "min context")
    return structure(data, Requirement, what="filters")


def page_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Errors on pages as pages: the sign-in page (401, or 403 for an admin page), else the
    status and message the API would answer, in the layout."""
    if isinstance(exc, SignInRequired):
        return _page(
            request,
            "signin.html",
            403 if exc.admin and session_of(request) is not None else 401,
            next=request.url.path,
            admin_needed=exc.admin,
            title="Sign in",
        )
    answer = gptstore_error(request, exc) if isinstance(exc, GptstoreError) else None
    if answer is None and isinstance(exc, HTTPException):
        answer = http_error(request, exc)
    if answer is None:
        raise exc
    message = answer.content["error"]["message"]
    status = answer.status_code or 500
    return _page(request, "error.html", status, message=message, title="Error")


class Storefront(Controller):
    path = "/"
    include_in_schema = False
    opt: Mapping[str, Any] = MappingProxyType({"role": None})  # pages check the session
    exception_handlers = {  # noqa: RUF012 (Litestar reads it from the class)
        SignInRequired: page_error,
        GptstoreError: page_error,
        HTTPException: page_error,
    }

    # -- signing in ------------------------------------------------------------------------

    @get("/signin", sync_to_thread=False)
    def signin_page(
        self, request: Request[Any, Any, Any], next: FromQuery[str | None] = None
    ) -> Template:
        return _page(request, "signin.html", next=_local(next), title="Sign in")

    @post("/signin", status_code=303, opt={"csrf": "form"})
    async def signin(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        form = await request.form()
        key = str(form.get("key", "")).strip()
        target = _local(str(form.get("next", "/")))
        settings: ServerSettings = state.settings
        role = settings.role_of(key.encode()) if key and key.isascii() else None
        if role is None:
            return _page(
                request,
                "signin.html",
                401,
                next=target,
                failed="That key is not one of this server's API keys.",
                title="Sign in",
            )
        sessions: Sessions = state.sessions
        sessions.close(request.cookies.get(COOKIE))
        session_id, _session = sessions.open(role, settings.key_id(key.encode()))
        response = Redirect(target, status_code=303)
        # Secure behind TLS (https, or a proxy's X-Forwarded-Proto that uvicorn trusts): the
        # browser then never sends it over plain HTTP.
        secure = request.url.scheme == "https"
        response.set_cookie(
            COOKIE, session_id, httponly=True, samesite="strict", path="/", secure=secure
        )
        return response

    @post("/signout", status_code=303, opt={"csrf": "form"})
    async def signout(self, request: Request[Any, Any, Any], state: State) -> Response[Any]:
        session = session_of(request)
        form = await request.form()
        if session is not None and csrf_ok(session, str(form.get("csrf", ""))):
            state.sessions.close(request.cookies.get(COOKIE))
        response = Redirect("/signin", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- the catalog ------------------------------------------------------------------------

    @get("/", sync_to_thread=True)
    def catalog(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        params = dict(request.query_params)
        requirement = _requirement(params)
        catalog = catalog_of(state)
        entries, total = catalog.search(requirement, limit=50)
        return _page(
            request,
            "catalog.html",
            title="Catalog",
            params=params,
            entries=[e.card for e in entries],
            total=total,
            facets=catalog.facets(requirement),
            filter_link=lambda name, value: "/?" + urlencode({**params, name: value}),
        )

    @get("/models/{uid:path}", sync_to_thread=True)
    def model(self, request: Request[Any, Any, Any], state: State, uid: FromPath[str]) -> Template:
        _viewer(request)
        entry = catalog_of(state).resolve(uid.lstrip("/"))
        return _page(request, "model.html", title=entry.card.uid, card=entry.card, entry=entry)

    @get("/select", sync_to_thread=True)
    def select(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        params = dict(request.query_params)
        policies = sorted(state.manager.registrations(ScoringPolicy))
        selection = None
        if params.get("run"):
            requirement = _requirement(params)
            name, scorer = make_scorer(
                state.manager, state.store.config(), params.get("policy") or "balanced"
            )
            selection = select_models(
                catalog_of(state),
                scorer,
                requirement,
                policy=name,
                limit=10,
                explain_excluded=10,
            )
        return _page(
            request,
            "select.html",
            title="Select a model",
            params=params,
            policies=policies,
            selection=selection,
        )

    # -- artifacts --------------------------------------------------------------------------

    @get("/artifacts", sync_to_thread=True)
    def artifacts(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        store = _artifacts(state)
        everything = store.list()
        ids = {a.id for a in everything}
        children = store.children()
        roots = [a for a in everything if a.manifest.parent not in ids]
        return _page(
            request,
            "artifacts.html",
            title="Artifacts and lineage",
            trees=[tree_of(root, children) for root in roots],
            count=len(everything),
        )

    @get("/artifacts/{artifact_id:str}", sync_to_thread=True)
    def artifact(
        self, request: Request[Any, Any, Any], state: State, artifact_id: FromPath[str]
    ) -> Template:
        _viewer(request)
        store = _artifacts(state)
        artifact = store.get(artifact_id)
        chart = None
        log = artifact.path / LOG_FILE
        if log.is_file():
            try:
                losses = json.loads(log.read_text())["loss"]
                chart = line_chart(
                    [(i + 1, float(v)) for i, v in enumerate(losses)],
                    title=f"Training loss of {artifact.id}",
                    x_label="step",
                    y_label="loss",
                )
            except (OSError, ValueError, KeyError, TypeError):
                chart = None
        size = sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file())
        return _page(
            request,
            "artifact.html",
            title=artifact.id,
            artifact=artifact,
            manifest=artifact.manifest,
            lineage=store.lineage(artifact),
            derived=store.children().get(artifact.id, []),
            chart=chart,
            size=format_bytes(size),
            deployable=sorted(state.manager.registrations(ServingBackend)),
        )

    # -- deployments ------------------------------------------------------------------------

    @get("/deployments", sync_to_thread=True)
    def deployments(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        deployments: Deployments = state.deployments
        return _page(
            request,
            "deployments.html",
            title="Deployments",
            deployments=[d.status() for d in deployments.list()],
            artifacts=[a.id for a in _artifacts(state).list()],
            backends=sorted(state.manager.registrations(ServingBackend)),
            done=_notice(request),
        )

    @get("/deployments/{name:str}", sync_to_thread=True)
    def deployment(
        self, request: Request[Any, Any, Any], state: State, name: FromPath[str]
    ) -> Template:
        _viewer(request)
        deployments: Deployments = state.deployments
        served = deployments.get(name)
        status = served.status()
        metrics: Metrics = state.metrics
        figures = metrics.summary(name)
        buckets = [
            (f"≤{bound:g}s" if bound != float("inf") else "more", count)
            for bound, count in figures["e2e"]["buckets"]
            if count
        ]
        return _page(
            request,
            "deployment.html",
            title=name,
            d=status,
            replicated=isinstance(served, ReplicatedDeployment),
            figures=figures,
            latency_chart=bar_chart(
                buckets, title=f"End-to-end latency of {name}'s requests", unit="requests"
            ),
            artifacts=[a.id for a in _artifacts(state).list()],
            backends=sorted(state.manager.registrations(ServingBackend)),
            done=_notice(request),
        )

    @post("/deployments", opt={"csrf": "form"})
    async def create_deployment(self, request: Request[Any, Any, Any], state: State) -> Redirect:
        form = await _form(request)
        name = form.get("name", "").strip()
        spec = _spec(form)
        deployments: Deployments = state.deployments
        by = changed_by(request)
        await anyio.to_thread.run_sync(lambda: deployments.create(name, spec, persist=True, by=by))
        return _done(request, f"/deployments/{quote(name)}", f"deployment {name} created")

    @post("/deployments/{name:str}/{action:str}", opt={"csrf": "form"})
    async def change_deployment(
        self,
        request: Request[Any, Any, Any],
        state: State,
        name: FromPath[str],
        action: FromPath[str],
    ) -> Redirect:
        form = await _form(request)
        deployments: Deployments = state.deployments
        by = changed_by(request)
        if action == "swap":
            spec = _spec(form)
            try:
                canary = float(form["canary"]) if form.get("canary") else None
            except ValueError:
                raise InvalidInput("canary", [f"a percentage, not {form['canary']!r}"]) from None
            await anyio.to_thread.run_sync(
                lambda: deployments.swap(name, spec, canary=canary, by=by)
            )
            message = f"version swapped in ({'canary' if canary else 'live'})"
        elif action in ("promote", "rollback"):
            act = deployments.promote if action == "promote" else deployments.rollback
            await anyio.to_thread.run_sync(lambda: act(name, by=by))
            message = "promoted" if action == "promote" else "rolled back"
        elif action == "delete":
            await anyio.to_thread.run_sync(deployments.delete, name)
            return _done(request, "/deployments", f"deployment {name} deleted")
        else:
            raise InvalidInput("action", [f"{action!r}: swap, promote, rollback or delete"])
        return _done(request, f"/deployments/{quote(name)}", message)

    # -- the chat playground ----------------------------------------------------------------

    @get("/chat", sync_to_thread=True)
    def chat(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        names = [d.name for d in state.deployments.list()]
        return _page(
            request,
            "chat.html",
            title="Chat",
            names=names,
            model=request.query_params.get("model") or (names[0] if names else ""),
            answer=None,
            message="",
        )

    @post("/chat", opt={"csrf": "form"})
    async def chat_answer(self, request: Request[Any, Any, Any], state: State) -> Template:
        """The playground without JavaScript: the whole answer at once."""
        form = await _form(request, admin=False)
        deployments: Deployments = state.deployments
        model, message = form.get("model", ""), form.get("message", "").strip()
        deployment = deployments.get(model)
        prompt = await deployment.chat_prompt([ChatMessage(role="user", content=message)])
        generation = (
            await deployment.generate([GenerationRequest(prompt=prompt, max_tokens=128)])
        )[0]
        return _page(
            request,
            "chat.html",
            title="Chat",
            names=[d.name for d in deployments.list()],
            model=model,
            message=message,
            answer=generation.text,
        )

    # -- jobs -------------------------------------------------------------------------------

    @get("/jobs", sync_to_thread=True)
    def jobs(self, request: Request[Any, Any, Any], state: State) -> Template:
        _viewer(request)
        jobs: Jobs = state.jobs
        return _page(
            request,
            "jobs.html",
            title="Optimization jobs",
            jobs=jobs.list(),
            artifacts=[a.id for a in _artifacts(state).list()],
            strategies=sorted(state.manager.registrations(OptimizationStrategy)),
            done=_notice(request),
        )

    @get("/jobs/{job_id:str}", sync_to_thread=True)
    def job(self, request: Request[Any, Any, Any], state: State, job_id: FromPath[str]) -> Template:
        _viewer(request)
        jobs: Jobs = state.jobs
        job = jobs.get(job_id)
        events = jobs.events(job_id)
        losses = [
            (float(m.group(1)), float(m.group(2)))
            for e in events
            if (m := _LOSS.search(str(e.get("message", ""))))
        ]
        chart = line_chart(losses, title="Training loss", x_label="step", y_label="loss")
        return _page(
            request,
            "job.html",
            title=f"Job {job.id}",
            job=job,
            events=events[-200:],
            chart=chart,
        )

    @post("/jobs", opt={"csrf": "form"})
    async def start_job(self, request: Request[Any, Any, Any], state: State) -> Redirect:
        form = await _form(request)
        body: dict[str, Any] = {"artifact": form.get("artifact", "")}
        if form.get("recipe_file"):
            body["recipe_file"] = form["recipe_file"]
        else:
            body["strategy"] = form.get("strategy", "")
            body["options"] = _json_object(form.get("options", ""), "options")
        if form.get("id"):
            body["id"] = form["id"]
        job_request = structure(body, JobRequest, what="job")
        jobs: Jobs = state.jobs
        by = changed_by(request)
        job = await anyio.to_thread.run_sync(lambda: jobs.submit(job_request, by=by))
        return _done(request, f"/jobs/{job.id}", "job started")

    @post("/jobs/{job_id:str}/cancel", opt={"csrf": "form"})
    async def cancel_job(
        self, request: Request[Any, Any, Any], state: State, job_id: FromPath[str]
    ) -> Redirect:
        await _form(request)
        jobs: Jobs = state.jobs
        await anyio.to_thread.run_sync(jobs.cancel, job_id)
        return _done(request, f"/jobs/{job_id}", "job cancelled")


def _spec(form: Mapping[str, str]) -> DeploymentSpec:
    """A deployment spec from a form: artifact, backend, replicas, options (JSON)."""
    data: dict[str, Any] = {
        "artifact": form.get("artifact", ""),
        "backend": form.get("backend", ""),
        "options": _json_object(form.get("options", ""), "options"),
    }
    if form.get("replicas"):
        if not form["replicas"].strip().isdecimal() or not form["replicas"].isascii():
            raise InvalidInput(
                "deployment", [f"replicas: a whole number, not {form['replicas']!r}"]
            )
        data["replicas"] = int(form["replicas"])
    return structure(data, DeploymentSpec, what="deployment")


def _json_object(text: str, what: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(what, [f"not JSON: {exc}"]) from None
    if not isinstance(value, dict):
        raise InvalidInput(what, ['a JSON object, e.g. {"steps": 60}'])
    return value


def _artifacts(state: State) -> ArtifactStore:
    store: Store = state.store
    return ArtifactStore(store.artifacts_dir)


def template_globals() -> dict[str, Any]:
    """What every template may call."""
    return {"format_count": format_count, "format_bytes": format_bytes, "quote": quote}
