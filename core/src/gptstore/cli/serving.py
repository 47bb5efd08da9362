"""Serving commands: ``serve`` (the HTTP API) and ``chat`` (one answer, in process)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Literal

import click

from gptstore.artifacts import ArtifactStore
from gptstore.cli.base import App, cli, emit_json, option_pairs, out, toml_pairs
from gptstore.errors import GptstoreError
from gptstore.serving.deployments import load_runner, plan
from gptstore.types import ChatMessage, GenerationRequest

log = logging.getLogger("gptstore.server")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=1,
    hidden=True,
    type=click.IntRange(min=1),
    help="Gone: set replicas = N in a deployment instead.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A TOML file whose [server] and [deployments.NAME] tables replace config.toml's.",
)
@click.option(
    "--drain-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM or Ctrl-C, seconds the requests in flight have to complete.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    help="Where replicas run: processes on this host (local), or Ray Serve on a Ray cluster "
    "(ray; pip install 'gptstore[ray]'). Default: [server] engine, else local.",
)
@click.option(
    "--ray-address",
    help="The Ray cluster (host:6379, ray://host:10001, auto). Default: [server.ray] address, "
    "else $RAY_ADDRESS, else a Ray started for this host.",
)
@click.pass_obj
def serve(
    app: App,
    host: str,
    port: int,
    workers: int,
    config: Path | None,
    drain_timeout: float,
    engine: Literal["local", "ray"] | None,
    ray_address: str | None,
) -> None:
    """Serve the OpenAI-compatible API and the store API over HTTP.

    Deployments in [deployments.NAME] are loaded at start; API keys come from [server]
    api_keys (both from config.toml, or from --config). OpenAPI docs are at /schema.

    SIGTERM (or Ctrl-C) drains: /ready answers 503 at once, new requests get 503, the requests
    and streams in flight complete (for up to --drain-timeout seconds), then the server exits 0.
    A second signal stops it at once.
    """
    if workers != 1:
        raise click.UsageError(
            "--workers is gone: the server routes each deployment's requests to its replica "
            "processes; set replicas = N in [deployments.NAME] instead"
        )
    import uvicorn

    from gptstore.server import create_app

    # Bad settings, and deployments whose artifact, backend or options are wrong, stop here,
    # before anything loads; a deployment that fails to load stops the server before it
    # listens (exit status 3, uvicorn's for a failed start-up).
    server_app = create_app(
        app.store.home, manager=app.manager, config=config, engine=engine, ray_address=ray_address
    )
    config_ = uvicorn.Config(server_app, host=host, port=port, log_level="info")
    draining_server(config_, server_app.state.drain, drain_timeout).run()


def draining_server(config: Any, drain: Any, timeout: float) -> Any:
    """uvicorn's server, whose first SIGTERM or SIGINT drains (see ``gptstore serve``) instead
    of closing the listening socket at once (vLLM's default shutdown aborts the requests in
    flight; uvicorn's stops taking connections, so /ready could not answer 503)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if drain.draining:  # a second signal: stop now
                self.force_exit = True
                super().handle_exit(sig, frame)
                return
            drain.draining = True
            log.warning(
                "draining: %d request(s) in flight, %g s to complete", drain.inflight, timeout
            )
            threading.Thread(target=self._exit_when_drained, daemon=True).start()

        def _exit_when_drained(self) -> None:
            deadline = time.monotonic() + timeout
            while drain.inflight > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            if drain.inflight:
                log.warning("drain timeout: %d request(s) still in flight", drain.inflight)
            self.should_exit = True

    config.timeout_graceful_shutdown = 1  # what is left after the drain is cut
    return Server(config)


@cli.command()
@click.argument("artifact")
@click.argument("message")
@click.option("--backend", required=True, help="Serving backend, e.g. onnx or torch.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@option_pairs("backend")
@click.pass_obj
def chat(
    app: App, artifact: str, message: str, backend: str, max_tokens: int, options: tuple[str, ...]
) -> None:
    """Ask ARTIFACT one chat MESSAGE on a serving backend and print the answer (greedy)."""
    # Checked and loaded as a deployment is: the same options are refused the same way.
    checked = plan(
        app.manager,
        ArtifactStore(app.store.artifacts_dir),
        artifact,
        backend,
        toml_pairs(options, "--option", "intra_op_threads=2"),
        where="--option",
    )
    runner = load_runner(checked)
    try:
        prompt = runner.chat_prompt([ChatMessage("user", message)])
        [answer] = runner.generate([GenerationRequest(prompt=prompt, max_tokens=max_tokens)])
    finally:
        runner.close()
    out.print(answer.text)


@cli.command()
@click.argument("name")
@click.argument("artifact", required=False)
@click.option("--backend", help="Serving backend (default: the live version's).")
@option_pairs("backend")
@click.option("--replicas", type=click.IntRange(1, 64), help="Replica processes (default: as now).")
@click.option(
    "--canary",
    type=click.FloatRange(0, 100, min_open=True),
    help="Send this percent of requests to the new version until --promote or --rollback.",
)
@click.option(
    "--gate",
    "gate_ratio",
    type=click.FloatRange(min=1),
    help="Refuse the new version when its perplexity exceeds the live one's by this factor.",
)
@click.option(
    "--rollback", is_flag=True, help="Drop the canary, or return to the previous version."
)
@click.option("--promote", is_flag=True, help="Make the canary the live version.")
@click.option(
    "--server",
    default="http://127.0.0.1:8000",
    show_default=True,
    envvar="GPTSTORE_SERVER",
    help="The running server (or $GPTSTORE_SERVER).",
)
@click.option(
    "--key",
    envvar="GPTSTORE_API_KEY",
    help="An admin API key (or $GPTSTORE_API_KEY).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the deployment's status as JSON.")
def deploy(
    name: str,
    artifact: str | None,
    backend: str | None,
    options: tuple[str, ...],
    replicas: int | None,
    canary: float | None,
    gate_ratio: float | None,
    rollback: bool,
    promote: bool,
    server: str,
    key: str | None,
    as_json: bool,
) -> None:
    """Deploy ARTIFACT as the next version of deployment NAME on a running server, live.

    The new version's replicas start, load and answer probe prompts while the live version
    serves; then traffic moves (all at once, or --canary PERCENT), and the old version stops
    once its requests in flight are done. If anything fails, the live version goes on serving
    and the reason is printed. Without ARTIFACT: --rollback or --promote.
    """
    if sum([artifact is not None, rollback, promote]) != 1:
        raise click.UsageError("give ARTIFACT, or --rollback, or --promote (one of them)")
    path = f"/store/deployments/{name}"
    if rollback or promote:
        state = _call(server, key, "POST", f"{path}/{'rollback' if rollback else 'promote'}")
    else:
        code, current = _request(server, key, "GET", path)
        body: dict[str, Any] = {}
        if code == 200:  # a new version: what is not given stays as the live version has it
            live = next(v for v in current["versions"] if v["version"] == current["version"])
            body = {k: v for k, v in live["spec"].items() if k != "artifact"}
        if backend is not None:
            body["backend"] = backend
            body["options"] = {}
        if options:
            body["options"] = toml_pairs(options, "--option", "intra_op_threads=2")
        if replicas is not None:
            body["replicas"] = replicas
        if "backend" not in body:
            raise click.UsageError(f"deployment {name!r} does not exist yet: give --backend")
        body["artifact"] = artifact
        if canary is not None:
            body["canary"] = canary
        if gate_ratio is not None:
            body["gate"] = {"max_perplexity_ratio": gate_ratio}
        out.print(
            f"deploying {artifact} as the next version of {name} on {server} ...", soft_wrap=True
        )
        state = _call(server, key, "PUT", path, body)
    if as_json:
        emit_json(state)
        return
    canary_now = state.get("canary")
    canary_text = (
        f", version {canary_now['version']} canary at {canary_now['percent']:g}%"
        if canary_now
        else ""
    )
    out.print(f"{name}: version {state['version']} live{canary_text}", soft_wrap=True)
    for version in state["versions"][-5:]:
        out.print(
            f"  v{version['version']}  {version['artifact']} on {version['backend']}  "
            f"{version['outcome']}  ({version['at'][:19]}, {version['by']})",
            soft_wrap=True,
        )


def _request(
    server: str, key: str | None, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server.rstrip("/") + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        data = error.read()
        try:
            return error.code, json.loads(data)
        except ValueError:
            return error.code, {"error": {"message": data.decode(errors="replace")}}
    except OSError as error:
        raise GptstoreError(
            f"cannot reach the server at {server}: {error}; is `gptstore serve` running?"
        ) from None


def _call(server: str, key: str | None, method: str, path: str, body: Any = None) -> Any:
    code, answer = _request(server, key, method, path, body)
    if code >= 400:
        message = (
            (answer or {}).get("error", {}).get("message", "")
            if isinstance(answer, dict)
            else answer
        )
        raise GptstoreError(f"{method} {path}: {code}: {message}")
    return answer
