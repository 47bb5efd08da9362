"""Artifact commands: ``fetch``, ``artifacts``, ``optimize``, ``eval`` and ``lineage``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from gptstore.artifacts import ArtifactStore
from gptstore.cli.base import (
    App,
    cli,
    data_option,
    emit_json,
    option_pairs,
    out,
    progress_line,
    toml_pairs,
)
from gptstore.converter import unstructure
from gptstore.optimization.data import default_heldout, load_dataset
from gptstore.optimization.evaluation import evaluate_artifact
from gptstore.optimization.run import optimize as optimize_artifact
from gptstore.sync import fetch_model
from gptstore.types import Artifact
from gptstore.units import format_bytes


@cli.command()
@click.argument("model")
@click.option(
    "--id",
    "artifact_id",
    help="The artifact's id (reused when it already holds this model at this revision).",
)
@click.pass_obj
def fetch(app: App, model: str, artifact_id: str | None) -> None:
    """Fetch MODEL from its source into the store as an artifact (pinned to the synced revision)."""
    entry = app.catalog.resolve(model)
    artifact = fetch_model(
        app.manager, app.config, entry.card, ArtifactStore(app.store.artifacts_dir), artifact_id
    )
    out.print(f"{entry.card.uid} -> artifact {artifact.id}\n{artifact.path}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def artifacts(app: App, as_json: bool) -> None:
    """List the store's artifacts with their origin and parent."""
    found = ArtifactStore(app.store.artifacts_dir).list()
    if as_json:
        emit_json([{**unstructure(a.manifest), "path": str(a.path)} for a in found])
        return
    table = Table("artifact", "kind", "origin", "parent", "files")
    for artifact in found:
        manifest = artifact.manifest
        size = sum((artifact.path / name).stat().st_size for name in manifest.files)
        table.add_row(
            artifact.id,
            manifest.kind,
            manifest.origin or "-",
            manifest.parent or "-",
            f"{len(manifest.files)} ({format_bytes(size)})",
        )
    out.print(table)


@cli.command()
@click.argument("artifact")
@click.argument("strategy")
@option_pairs("strategy")
@click.option(
    "--id",
    "new_id",
    help="The new artifact's id (reused when it was made the same way from the same parent).",
)
@data_option("Training or calibration data")
@click.pass_obj
def optimize(
    app: App,
    artifact: str,
    strategy: str,
    options: tuple[str, ...],
    new_id: str | None,
    data_file: Path | None,
) -> None:
    """Derive a new artifact from ARTIFACT with an optimization STRATEGY (onnx-export, ...)."""
    parsed = toml_pairs(options, "--option", "max_logit_diff=0.01")
    data = load_dataset(data_file) if data_file else None
    with progress_line() as progress:
        task = progress.add_task(f"{strategy} on {artifact}")
        derived = optimize_artifact(
            app.manager,
            ArtifactStore(app.store.artifacts_dir),
            artifact,
            strategy,
            parsed,
            data=data,
            progress=lambda f, m: progress.update(task, description=f"{m} ({f:.0%})"),
            new_id=new_id,
        )
    manifest = derived.manifest
    out.print(f"{artifact} -> {derived.id} ({manifest.kind})")
    for metric, number in {**manifest.metrics_before, **manifest.metrics_after}.items():
        out.print(f"  {metric}: {number:.6g}")


@cli.command("eval")
@click.argument("artifact")
@click.option("--backend", required=True, help="Serving backend to measure on, e.g. onnx or torch.")
@data_option(
    "Held-out text for perplexity (default: the held-out tenth of the built-in corpus, "
    "pydoc_data.topics)"
)
@option_pairs("backend")
@click.option(
    "--max-tokens",
    default=32,
    show_default=True,
    type=click.IntRange(min=2),
    help="Tokens generated to time decoding.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def evaluate(
    app: App,
    artifact: str,
    backend: str,
    data_file: Path | None,
    options: tuple[str, ...],
    max_tokens: int,
    as_json: bool,
) -> None:
    """Measure ARTIFACT on this host: held-out perplexity, decode tokens/s at batch 1, time to
    first token and resident memory after loading; recorded in its manifest as measured."""
    with progress_line() as progress:
        progress.add_task(f"measuring {artifact} on {backend}")
        result = evaluate_artifact(
            app.manager,
            ArtifactStore(app.store.artifacts_dir),
            artifact,
            backend,
            toml_pairs(options, "--option", "intra_op_threads=2"),
            load_dataset(data_file) if data_file else default_heldout(),
            max_new_tokens=max_tokens,
        )
    if as_json:
        emit_json([unstructure(m) for m in result.measurements])
        return
    table = Table("measured here", "value", "backend", "on")
    for m in result.measurements:
        shown = format_bytes(m.value) if m.name == "resident_bytes" else f"{m.value:.4g}"
        table.add_row(m.name, shown, m.backend, m.data or m.host)
    out.print(table)
    out.print(f"recorded in {result.artifact.path / 'manifest.json'}")


def _node(artifact: Artifact, children: dict[str, list[Artifact]]) -> dict[str, Any]:
    manifest = artifact.manifest
    return {
        "id": artifact.id,
        "kind": manifest.kind,
        "origin": manifest.origin,
        "step": unstructure(manifest.step),
        "data_digest": manifest.data_digest,
        "metrics_before": manifest.metrics_before,
        "metrics_after": manifest.metrics_after,
        "measured": unstructure(manifest.measured),
        "derived": [_node(child, children) for child in children.get(artifact.id, [])],
    }


def _label(node: dict[str, Any], asked: str) -> Text:
    label = Text(node["id"], style="bold" if node["id"] == asked else "")
    step = node["step"]
    label.append(f"  {node['kind']}")
    if step is not None:
        options = ", ".join(f"{k}={v}" for k, v in sorted(step["options"].items()))
        label.append(f"  {step['strategy']}" + (f" ({options})" if options else ""), style="cyan")
    else:
        label.append(f"  imported from {node['origin'] or '?'}", style="cyan")
    figures = [f"{k} {v:.4g}" for k, v in node["metrics_after"].items()]
    figures += [f"{m['name']}@{m['backend']} {m['value']:.4g}" for m in node["measured"]]
    if figures:
        label.append("\n" + "; ".join(figures), style="dim")
    return label


@cli.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def lineage(app: App, artifact: str, as_json: bool) -> None:
    """The tree ARTIFACT belongs to, from the imported model down: each step with its options,
    its figures and those gptstore eval measured."""
    store = ArtifactStore(app.store.artifacts_dir)
    root = store.lineage(store.get(artifact))[-1]
    tree = _node(root, store.children())
    if as_json:
        emit_json(tree)
        return

    def grow(parent: Tree, node: dict[str, Any]) -> None:
        for child in node["derived"]:
            grow(parent.add(_label(child, artifact)), child)

    shown = Tree(_label(tree, artifact))
    grow(shown, tree)
    out.print(shown)
