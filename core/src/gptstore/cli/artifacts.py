"""Artifact commands: ``fetch``, ``artifacts``, ``optimize``, ``eval`` and ``lineage``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from gptstore.artifacts import ArtifactStore, tree_of
from gptstore.cli.base import (
    App,
    cli,
    data_option,
    emit_json,
    option_pairs,
    out,
    progress_line,
    stage_progress,
    toml_pairs,
)
from gptstore.converter import structure, unstructure
from gptstore.errors import GptstoreError
from gptstore.optimization.data import default_heldout, load_dataset
from gptstore.optimization.evaluation import evaluate_artifact
from gptstore.optimization.recipes import (
    RecipeRun,
    RecipeStopped,
    describe_check,
    load_recipe,
    run_recipe,
)
from gptstore.optimization.run import optimize as optimize_artifact
from gptstore.sync import fetch_model
from gptstore.types import GateCheck
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
@click.argument("strategy", required=False)
@option_pairs("strategy")
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run the steps of a recipe (TOML) from ARTIFACT instead of one STRATEGY.",
)
@click.option(
    "--id",
    "new_id",
    help="The new artifact's id (with --recipe: the last step's); reused when it was made the "
    "same way from the same parent.",
)
@data_option("Training or calibration data")
@click.option("--json", "as_json", is_flag=True, help="Print the recipe run's report as JSON.")
@click.pass_obj
def optimize(
    app: App,
    artifact: str,
    strategy: str | None,
    options: tuple[str, ...],
    recipe_file: Path | None,
    new_id: str | None,
    data_file: Path | None,
    as_json: bool,
) -> None:
    """Derive a new artifact from ARTIFACT with an optimization STRATEGY (onnx-export, lora,
    prune-mlp...), or with the steps and quality gates of a --recipe."""
    store = ArtifactStore(app.store.artifacts_dir)
    if recipe_file is not None:
        if strategy or options or data_file:
            raise GptstoreError(
                "--recipe takes no STRATEGY, --option or --data: the recipe file sets them"
            )
        _run_recipe(app, store, artifact, recipe_file, new_id, as_json)
        return
    if strategy is None:
        raise GptstoreError("name a STRATEGY (see gptstore plugins) or give --recipe FILE.toml")
    parsed = toml_pairs(options, "--option", "max_logit_diff=0.01")
    data = load_dataset(data_file) if data_file else None
    with stage_progress(f"{strategy} on {artifact}") as progress:
        derived = optimize_artifact(
            app.manager, store, artifact, strategy, parsed, data=data, progress=progress,
            new_id=new_id,
        )  # fmt: skip
    manifest = derived.manifest
    out.print(f"{artifact} -> {derived.id} ({manifest.kind})")
    for metric, number in {**manifest.metrics_before, **manifest.metrics_after}.items():
        out.print(f"  {metric}: {number:.6g}")


def _run_recipe(
    app: App,
    store: ArtifactStore,
    artifact: str,
    recipe_file: Path,
    final_id: str | None,
    as_json: bool,
) -> None:
    loaded = load_recipe(app.manager, recipe_file)
    reports = app.store.home / "runs"
    try:
        with stage_progress(f"recipe {loaded.recipe.name} on {artifact}") as progress:
            run = run_recipe(
                app.manager,
                store,
                loaded,
                artifact,
                progress=progress,
                report_dir=reports,
                final_id=final_id,
            )
    except RecipeStopped as stopped:
        if as_json:
            emit_json(unstructure(stopped.run))
        else:
            _print_run(stopped.run)
        raise
    if as_json:
        emit_json(unstructure(run))
        return
    _print_run(run)


def _print_run(run: RecipeRun) -> None:
    table = Table("step", "strategy", "artifact", "status", "gates", "time")
    for step in run.steps:
        gates = "\n".join(describe_check(c) for c in step.gates) or "-"
        table.add_row(
            str(step.index + 1),
            step.strategy,
            step.artifact or "-",
            step.status + (f": {step.error}" if step.error else ""),
            gates,
            f"{step.seconds:.0f}s",
        )
    out.print(table)
    verdict = "passed every gate" if run.passed else "stopped"
    out.print(f"recipe {run.recipe} on {run.input} {verdict}; final artifact {run.final}")
    if run.report:
        out.print(f"report: {run.report}")


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
    for check in node["gates"]:
        label.append(
            f"\ngate {'passed' if check['passed'] else 'FAILED'}: "
            + describe_check(structure(check, GateCheck, what="gate")),
            style="green" if check["passed"] else "red",
        )
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
    tree = tree_of(root, store.children())
    if as_json:
        emit_json(tree)
        return

    def grow(parent: Tree, node: dict[str, Any]) -> None:
        for child in node["derived"]:
            grow(parent.add(_label(child, artifact)), child)

    shown = Tree(_label(tree, artifact))
    grow(shown, tree)
    out.print(shown)
