"""Catalog commands: ``plugins``, ``sources``, ``sync``, ``search``, ``show`` and ``select``."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from gptstore.cli.base import App, cli, emit_json, err, out, progress_line
from gptstore.converter import structure, unstructure
from gptstore.errors import GptstoreError
from gptstore.manager import build
from gptstore.records import ModelSource, OptimizationStrategy, ScoringPolicy, ServingBackend
from gptstore.selection import (
    Selection,
    candidate_json,
    explain_model,
    make_scorer,
    select_models,
    selection_json,
)
from gptstore.sync import enabled_sources, sync_catalog
from gptstore.types import ModelCard, Requirement
from gptstore.units import format_bytes, format_count, parse_bytes, parse_count


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins(app: App, as_json: bool) -> None:
    """List plugins: version, distribution, hooks, what they provide, and failures."""
    manager = app.manager
    provided: dict[str, list[str]] = {}
    for record_type in (ModelSource, ScoringPolicy, OptimizationStrategy, ServingBackend):
        by_plugin: dict[str, list[str]] = {}
        for name, info in manager.providers(record_type).items():
            by_plugin.setdefault(info.name, []).append(name)
        for plugin, names in by_plugin.items():
            provided.setdefault(plugin, []).append(f"{record_type.kind}: {', '.join(names)}")
    infos = manager.plugin_infos()
    if as_json:
        emit_json([{**unstructure(i), "provides": provided.get(i.name, [])} for i in infos])
        return
    styles = {"loaded": "green", "failed": "red"}
    table = Table()
    for header in ("plugin", "version", "distribution", "hooks / provides", "status"):
        table.add_column(header, overflow="fold")  # a name cut with "…" could not be typed
    for info in infos:
        detail = ", ".join(h.removeprefix("gptstore_") for h in info.hooks)
        if provided.get(info.name):
            detail += "\n" + "\n".join(provided[info.name])
        status = Text(info.status, style=styles.get(info.status, "yellow"))
        table.add_row(info.name, info.version or "", info.distribution or "", detail, status)
    out.print(table)
    # Why a plugin failed or is disabled goes under the table at full width, folded: in a table
    # cell a long error (a module path, a file and line) would be cut at the terminal's edge.
    for info in infos:
        if info.error:
            out.print(
                Text.assemble(
                    (f"{info.name} {info.status}: ", styles.get(info.status, "yellow")),
                    info.error,
                    overflow="fold",
                )
            )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def sources(app: App, as_json: bool) -> None:
    """List model sources, whether each is enabled, and whether it can answer now."""
    providers = app.manager.providers(ModelSource)
    rows = []
    for name, record in sorted(app.manager.registrations(ModelSource).items()):
        enabled = app.config.source_enabled(name)
        try:
            status = build(
                record, app.config.source_options(name), where=f"$.sources.{name}"
            ).status()
            online, message = status.online, status.message
        except GptstoreError as exc:
            online, message = False, str(exc)
        rows.append(
            {
                "name": name,
                "plugin": providers[name].name,
                "enabled": enabled,
                "online": online,
                "status": message,
                "description": record.description,
            }
        )
    if as_json:
        emit_json(rows)
        return
    table = Table("source", "plugin", "enabled", "status", "description")
    for row in rows:
        state = Text(
            "online" if row["online"] else "offline", style="green" if row["online"] else "yellow"
        )
        state.append(f"\n{row['status']}", style="dim")
        table.add_row(
            row["name"], row["plugin"], "yes" if row["enabled"] else "no", state, row["description"]
        )
    out.print(table)


@cli.command()
@click.argument("names", nargs=-1)
@click.pass_obj
def sync(app: App, names: tuple[str, ...]) -> None:
    """Fill the catalog from every enabled source (or only NAMES)."""
    selected = enabled_sources(app.manager, app.config, names)
    if not selected:
        raise GptstoreError("no enabled model sources; see `gptstore sources`")
    with progress_line() as progress:
        task = progress.add_task("listing sources")

        def report(source: str, count: int) -> None:
            progress.update(task, description=f"{source}: {count} cards listed")

        results = sync_catalog(app.catalog, app.manager, app.config, names, report)
    failed = False
    for result in results:
        if result.error:
            failed = True
            err.print(Text(f"{result.source}: failed: {result.error}", style="red"))
            continue
        out.print(
            f"{result.source}: {result.added} added, {result.updated} updated, "
            f"{result.unchanged} unchanged, {result.delisted} delisted, "
            f"{len(result.refused)} refused"
        )
        if result.offline:
            out.print(
                Text(
                    f"  {result.source} is offline, so nothing was delisted: {result.offline}",
                    style="yellow",
                )
            )
        for model_id, reason in result.refused:
            out.print(Text(f"  refused {model_id}: {reason}", style="yellow"))
    out.print(
        f"catalog: {app.catalog.count(listed_only=True)} listed models in {app.store.catalog_path}"
    )
    if failed:
        sys.exit(1)


def _pairs(texts: tuple[str, ...], flag: str, example: str) -> dict[str, float]:
    """``("mmlu=0.5", ...)`` -> ``{"mmlu": 0.5}``; a malformed pair is a one-line error."""
    pairs: dict[str, float] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        try:
            pairs[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise GptstoreError(f"{flag} {text!r}: write NAME=VALUE, e.g. {example}")
    return pairs


def requirement_options(func: Any) -> Any:
    options = [
        click.option("--task", help="Task the model must do, e.g. text-generation."),
        click.option("--min-params", help="Fewest parameters, e.g. 100M."),
        click.option("--max-params", help="Most parameters, e.g. 2B."),
        click.option(
            "--license",
            "licenses",
            multiple=True,
            help="Allowed license (repeatable), e.g. apache-2.0.",
        ),
        click.option(
            "--language",
            "languages",
            multiple=True,
            help="Language the model must list (repeatable), e.g. en.",
        ),
        click.option("--min-context", type=int, help="Least context length in tokens."),
        click.option("--memory", help="Memory budget for the weights, e.g. 2GB."),
        click.option("--dtype", help="Dtype to compute --memory at (default: the model's own)."),
        click.option(
            "--min-metric",
            "metric_floors",
            multiple=True,
            help="Metric floor NAME=VALUE on a 0-1 scale (repeatable), e.g. mmlu=0.5.",
        ),
        click.option(
            "--max-measured",
            "measured_ceilings",
            multiple=True,
            help="Ceiling FIGURE@BACKEND=VALUE on a figure gptstore eval measured here "
            "(repeatable), e.g. perplexity@onnx=25.",
        ),
        click.option(
            "--min-measured",
            "measured_floors",
            multiple=True,
            help="Floor FIGURE@BACKEND=VALUE on a figure gptstore eval measured here "
            "(repeatable), e.g. decode_tokens_per_s@onnx=40.",
        ),
        click.option("--source", "sources", multiple=True, help="Only this source (repeatable)."),
        click.option(
            "--include-delisted",
            is_flag=True,
            help="Also consider cards their source no longer lists.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _measured_bounds(ceilings: tuple[str, ...], floors: tuple[str, ...]) -> list[dict[str, Any]]:
    """--max-measured / --min-measured pairs as MeasuredBound data, one bound per figure."""
    bounds: dict[str, dict[str, Any]] = {}
    example = "perplexity@onnx=25"
    for key, pairs, flag in (
        ("at_most", ceilings, "--max-measured"),
        ("at_least", floors, "--min-measured"),
    ):
        for name, value in _pairs(pairs, flag, example).items():
            bounds.setdefault(name, {"name": name})[key] = value
    return list(bounds.values())


def _requirement(query: str | None, **flags: Any) -> Requirement:
    data: dict[str, Any] = {
        "task": flags["task"],
        "min_params": parse_count(flags["min_params"], "--min-params")
        if flags["min_params"]
        else None,
        "max_params": parse_count(flags["max_params"], "--max-params")
        if flags["max_params"]
        else None,
        "licenses": list(flags["licenses"]),
        "languages": list(flags["languages"]),
        "min_context": flags["min_context"],
        "memory_budget": parse_bytes(flags["memory"], "--memory") if flags["memory"] else None,
        "dtype": flags["dtype"],
        "metric_floors": [
            {"name": k, "minimum": v}
            for k, v in _pairs(flags["metric_floors"], "--min-metric", "mmlu=0.5").items()
        ],
        "measured": _measured_bounds(flags["measured_ceilings"], flags["measured_floors"]),
        "sources": list(flags["sources"]),
        "query": query,
        "include_delisted": flags["include_delisted"],
    }
    return structure(data, Requirement, what="requirement")


# -- search and show --


def _card_summary(card: ModelCard) -> dict[str, str]:
    return {
        "params": format_count(card.parameters),
        "context": str(card.context_length or "?"),
        "license": card.license or "?",
        "tasks": ", ".join(card.tasks) or "?",
    }


@cli.command()
@click.argument("text", required=False)
@requirement_options
@click.option(
    "--limit",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most results to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def search(app: App, /, text: str | None, limit: int, as_json: bool, **flags: Any) -> None:
    """Search the catalog by TEXT (name, description, tags) and filters."""
    requirement = _requirement(text, **flags)
    entries, total = app.catalog.search(requirement, limit=limit)
    if as_json:
        emit_json(
            {
                "total": total,
                "results": [
                    {**unstructure(e.card), "uid": e.card.uid, "listed": e.listed} for e in entries
                ],
            }
        )
        return
    table = Table("model", "params", "context", "license", "tasks", "description")
    for entry in entries:
        summary = _card_summary(entry.card)
        table.add_row(
            entry.card.uid,
            summary["params"],
            summary["context"],
            summary["license"],
            summary["tasks"],
            entry.card.description[:60],
        )
    out.print(table)
    out.print(f"{len(entries)} of {total} matching models shown")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def show(app: App, model: str, as_json: bool) -> None:
    """Show the full card of MODEL (SOURCE:ID, or ID when only one source has it)."""
    entry = app.catalog.resolve(model)
    card = entry.card
    if as_json:
        emit_json(
            {
                **unstructure(card),
                "uid": card.uid,
                "listed": entry.listed,
                "synced_at": entry.synced_at,
            }
        )
        return
    table = Table(show_header=False, title=card.uid, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", card.name),
        ("source", card.source),
        ("revision", card.revision or "?"),
        ("architecture", card.architecture or "?"),
        ("parameters", f"{format_count(card.parameters)} ({card.parameters or '?'})"),
        ("dtype", card.dtype or "?"),
        ("size on disk", format_bytes(card.size_bytes)),
        ("context length", str(card.context_length or "?")),
        ("tasks", ", ".join(card.tasks) or "?"),
        ("languages", ", ".join(card.languages) or "?"),
        ("license", card.license or "?"),
        ("tags", ", ".join(card.tags) or "-"),
        ("base model", card.base_model or "-"),
        (
            "metrics",
            "\n".join(
                f"{m.name}: {m.value:g} ({m.kind or 'value'}, {m.origin})" for m in card.metrics
            )
            or "-",
        ),
        ("popularity", f"{card.popularity:,} downloads, {card.likes:,} likes"),
        ("created", str(card.created_at or "?")),
        ("updated", str(card.updated_at or "?")),
        ("location", card.location or "-"),
        ("listed", "yes" if entry.listed else "no (its source no longer lists it)"),
        ("description", card.description or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


# -- select --


@cli.command()
@click.argument("query", required=False)
@requirement_options
@click.option("--policy", default="balanced", show_default=True, help="Scoring policy.")
@click.option(
    "--weight",
    "weights",
    multiple=True,
    help="Policy weight NAME=VALUE over [policies.NAME] weights (repeatable), e.g. quality=0.6.",
)
@click.option(
    "--limit",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most ranked models to show.",
)
@click.option(
    "--explain-excluded",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many excluded models to explain, in catalog order (0: none).",
)
@click.option(
    "--why",
    "why",
    multiple=True,
    metavar="MODEL",
    help="Explain where MODEL stands: its failed constraints, or its score.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def select(
    app: App,
    /,
    query: str | None,
    policy: str,
    weights: tuple[str, ...],
    limit: int,
    explain_excluded: int,
    why: tuple[str, ...],
    as_json: bool,
    **flags: Any,
) -> None:
    """Select the best models for a requirement, ranked and explained.

    QUERY is optional free text the model's name, description or tags must match.
    """
    requirement = _requirement(query, **flags)
    name, scorer = make_scorer(
        app.manager,
        app.config,
        policy,
        weights=_pairs(weights, "--weight", "quality=0.6"),
        where="--weight",
    )
    selection = select_models(
        app.catalog,
        scorer,
        requirement,
        policy=name,
        limit=limit,
        explain_excluded=explain_excluded,
    )
    explained = [explain_model(app.catalog, scorer, requirement, model) for model in why]
    if as_json:
        emit_json(
            {**selection_json(selection), "why": [candidate_json(c, card=True) for c in explained]}
        )
        return
    _print_selection(selection)
    for candidate in explained:
        if candidate.failures:
            out.print(f"{candidate.card.uid} is excluded: " + "; ".join(candidate.failures))
        else:
            assert candidate.score is not None
            out.print(
                f"{candidate.card.uid} meets the requirement, score "
                f"{candidate.score.total:.3f}: "
                + "; ".join(
                    f"{c.name} {c.value:.2f}×{c.weight:g} ({c.detail})"
                    for c in candidate.score.breakdown
                )
            )


def _print_selection(selection: Selection) -> None:
    table = Table(
        "#",
        "model",
        "params",
        "score",
        "why",
        title=f"policy {selection.policy}",
        title_justify="left",
    )
    for candidate in selection.ranked:
        assert candidate.score is not None
        why = "\n".join(
            f"{c.name} {c.value:.2f}×{c.weight:g}: {c.detail}" for c in candidate.score.breakdown
        )
        table.add_row(
            str(candidate.rank),
            candidate.card.uid,
            format_count(candidate.card.parameters),
            f"{candidate.score.total:.3f}",
            why,
        )
    out.print(table)
    out.print(
        f"{selection.matched} of {selection.total} models meet the requirement"
        + (
            f"; showing the best {len(selection.ranked)}"
            if selection.matched > len(selection.ranked)
            else ""
        )
    )
    if selection.excluded:
        excluded = Table("excluded model", "failed constraints")
        for candidate in selection.excluded:
            excluded.add_row(candidate.card.uid, "\n".join(candidate.failures))
        out.print(excluded)
        hidden = selection.total - selection.matched - len(selection.excluded)
        if hidden > 0:
            out.print(f"... and {hidden} more excluded (raise --explain-excluded to see them)")
    if not selection.ranked:
        err.print(
            Text(
                "no model meets every constraint; the table above says what each one failed",
                style="yellow",
            )
        )
