"""Serving commands: ``serve`` (the HTTP API) and ``chat`` (one answer, in process)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from gptstore.artifacts import ArtifactStore
from gptstore.cli.base import App, cli, option_pairs, out, toml_pairs
from gptstore.serving.deployments import load_runner, plan
from gptstore.types import ChatMessage, GenerationRequest


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes; each loads every deployment.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A TOML file whose [server] and [deployments.NAME] tables replace config.toml's.",
)
@click.pass_obj
def serve(app: App, host: str, port: int, workers: int, config: Path | None) -> None:
    """Serve the OpenAI-compatible API and the store API over HTTP.

    Deployments in [deployments.NAME] are loaded at start; API keys come from [server]
    api_keys (both from config.toml, or from --config). OpenAPI docs are at /schema.
    """
    import uvicorn

    from gptstore.server.settings import SERVER_CONFIG_ENV, plan_deployments, server_config

    # Bad settings, and deployments whose artifact, backend or options are wrong, stop here,
    # before any worker starts; a deployment that fails to load stops the server before it
    # listens (exit status 3, uvicorn's for a failed start-up).
    plan_deployments(
        server_config(app.store, config), app.manager, ArtifactStore(app.store.artifacts_dir)
    )
    os.environ["GPTSTORE_HOME"] = str(app.store.home)
    if config is not None:
        os.environ[SERVER_CONFIG_ENV] = str(config.resolve())
    else:  # the workers read what was checked here: config.toml
        os.environ.pop(SERVER_CONFIG_ENV, None)
    uvicorn.run(
        "gptstore.server:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )


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
