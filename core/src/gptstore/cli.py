"""The ``gptstore`` command.

User mistakes (a bad flag value, an unknown model or policy) print one line and exit 1; no
traceback. Heavy libraries are never imported here.

Most of what is printed comes from elsewhere (model cards, plugin records and errors, file paths),
so rich reads no markup and no emoji codes in it: ``[beta]`` or ``:x:`` is printed as written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tomllib
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import click
import tomli_w
from attrs import fields_dict
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

from gptstore import __version__
from gptstore.artifacts import ArtifactStore
from gptstore.catalog import Catalog
from gptstore.config import Config, Store
from gptstore.converter import structure, unstructure
from gptstore.errors import GptstoreError
from gptstore.manager import (
    PluginLoadWarning,
    PluginManager,
    build,
    make_plugin_manager,
    structure_options,
)
from gptstore.optimization.data import load_dataset
from gptstore.optimize import optimize as optimize_artifact
from gptstore.records import ModelSource, OptimizationStrategy, ScoringPolicy, ServingBackend
from gptstore.selection import (
    Selection,
    candidate_json,
    explain_model,
    make_scorer,
    select_models,
    selection_json,
)
from gptstore.serving.deployments import load_runner, plan
from gptstore.sync import enabled_sources, fetch_model, sync_catalog
from gptstore.types import ChatMessage, GenerationRequest, ModelCard, Requirement
from gptstore.units import format_bytes, format_count, parse_bytes, parse_count

out = Console(soft_wrap=False, markup=False, emoji=False)
err = Console(stderr=True, markup=False, emoji=False)


class App:
    """What commands share: the store home, its config, the plugin manager and the catalog."""

    def __init__(self, home: Path | None) -> None:
        self.store = Store(home)

    @cached_property
    def manager(self) -> PluginManager:
        return make_plugin_manager()

    @cached_property
    def config(self) -> Config:
        return self.store.config()

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.store.catalog_path)


class GptstoreGroup(click.Group):
    """Turns GptstoreError into one clean line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GptstoreError as exc:
            raise click.ClickException(str(exc)) from None
        except sqlite3.Error as exc:
            raise click.ClickException(f"catalog: {exc}") from None
        except OSError as exc:  # a home or model folder that cannot be read or written
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}") from None


def _show_warning(message: Any, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    label = "plugin" if issubclass(category, PluginLoadWarning) else category.__name__
    err.print(Text(f"warning ({label}): {message}", style="yellow"))


@click.group(cls=GptstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gptstore")
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="GPTSTORE_HOME",
    help="Store home (default: $GPTSTORE_HOME or ~/.gptstore).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """gptstore: select, optimize, deploy and serve language models."""
    warnings.showwarning = _show_warning
    if home is not None:
        os.environ["GPTSTORE_HOME"] = str(home)  # plugins find the same home
    ctx.obj = App(home)


def _progress() -> Progress:
    """A transient spinner line on stderr; its text (source names, a strategy's messages) is
    printed as written, never read as markup."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}", markup=False), console=err, transient=True
    )


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# -- init --


@cli.command()
@click.option(
    "--local-path",
    "local_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A folder of HF-format model folders for the local source (repeatable).",
)
@click.pass_obj
def init(app: App, local_paths: tuple[Path, ...]) -> None:
    """Create the store home and its config.toml (adding local model folders)."""
    data = app.store.read_raw_config()
    if local_paths:
        local = data.setdefault("sources", {}).setdefault("local", {})
        paths = list(local.get("paths", []))
        for path in local_paths:
            resolved = str(path.expanduser().resolve())
            if not Path(resolved).is_dir():
                raise GptstoreError(f"--local-path {path}: no such folder")
            if resolved not in paths:
                paths.append(resolved)
        local["paths"] = paths
    app.store.write_raw_config(data)
    Catalog(app.store.catalog_path).close()
    out.print(f"store home {app.store.home} ready; config in {app.store.config_path}")


@cli.group()
def config() -> None:
    """Read and change config.toml."""


@config.command("show")
@click.pass_obj
def config_show(app: App) -> None:
    """Print config.toml."""
    out.print(tomli_w.dumps(app.store.read_raw_config()) or "# empty")


@config.command("set")
@click.argument("key")
@click.argument("value")
@click.pass_obj
def config_set(app: App, key: str, value: str) -> None:
    """Set KEY (dotted, e.g. sources.gguf.packages) to VALUE, read as TOML when it parses
    (["a", "b"], 5, true) and as a plain string otherwise.

    The changed table is checked as the code that reads it will check it; config.toml is left
    unchanged when it is wrong."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise GptstoreError(
            f"config key {key!r}: write SECTION.NAME[.OPTION], e.g. sources.local.paths"
        )
    sections = list(fields_dict(Config))
    if parts[0] not in sections:
        raise GptstoreError(
            f"config key {key!r}: unknown section {parts[0]!r}; config.toml has "
            + ", ".join(sections)
        )
    try:
        parsed = tomllib.loads(f"value = {value}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = value
    data = app.store.read_raw_config()
    table = data
    for part in parts[:-1]:
        child = table.setdefault(part, {})
        if not isinstance(child, dict):
            raise GptstoreError(f"config key {key!r}: {part} is a value, not a table")
        table = child
    table[parts[-1]] = parsed
    try:
        unchecked = _check_config_table(app.manager, data, parts)
    except GptstoreError as exc:
        hint = ""
        if "required field missing" in str(exc) and not isinstance(parsed, dict):
            hint = (  # one key at a time cannot add a table whose keys are all required
                f"; set the required keys together as one table, e.g. gptstore config set "
                f"{'.'.join(parts[:2])} '{{ KEY = VALUE, OTHER = VALUE }}'"
            )
        raise GptstoreError(f"config set {key}: {exc}; config.toml is unchanged{hint}") from None
    app.store.write_raw_config(data)
    out.print(f"{key} = {tomli_w.dumps({'v': parsed}).removeprefix('v = ').strip()}")
    if unchecked:
        err.print(Text(f"warning: {unchecked}", style="yellow"))


def _check_config_table(manager: PluginManager, data: dict[str, Any], parts: list[str]) -> str:
    """Check the table of config.toml ``data`` that a ``config set`` of ``parts`` changed, as the
    code that reads it will: a source's or policy's table against its plugin's options, the
    server's tables as ``gptstore serve`` reads them. Returns why it could not be checked (no
    installed plugin provides that source or policy; one may be installed later), else ""."""
    config = structure(data, Config, what="config.toml")
    section, name = parts[0], parts[1]
    if section in ("sources", "policies"):
        record_type = {"sources": ModelSource, "policies": ScoringPolicy}[section]
        records = manager.registrations(record_type)
        if name not in records:
            return (
                f"no installed plugin provides a {record_type.kind} named {name!r} "
                f"(installed: {', '.join(sorted(records)) or 'none'}), so [{section}.{name}] "
                "was saved unchecked"
            )
        if section == "sources":
            # `enabled` is the core's switch, not the plugin's option.
            enabled = config.sources[name].get("enabled", True)
            structure(enabled, bool, what="config.toml", path=f"$.sources.{name}.enabled")
            options = config.source_options(name)
        else:
            options = config.policies[name]
        structure_options(records[name], options, where=f"$.{section}.{name}")
    elif section in ("server", "deployments"):
        from gptstore.server.settings import parse_server_config

        parse_server_config(data, {"server": "config.toml", "deployments": "config.toml"})
    return ""


# -- plugins and sources --


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
        _emit_json([{**unstructure(i), "provides": provided.get(i.name, [])} for i in infos])
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
        _emit_json(rows)
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


# -- sync --


@cli.command()
@click.argument("names", nargs=-1)
@click.pass_obj
def sync(app: App, names: tuple[str, ...]) -> None:
    """Fill the catalog from every enabled source (or only NAMES)."""
    selected = enabled_sources(app.manager, app.config, names)
    if not selected:
        raise GptstoreError("no enabled model sources; see `gptstore sources`")
    with _progress() as progress:
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
        _emit_json([{**unstructure(a.manifest), "path": str(a.path)} for a in found])
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
@click.argument("strategy")
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A strategy option, VALUE read as TOML when it parses (repeatable).",
)
@click.option(
    "--id",
    "new_id",
    help="The new artifact's id (reused when it was made the same way from the same parent).",
)
@click.option(
    "--data",
    "data_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Training or calibration data: a text file (one example per line) or JSONL "
    '(objects with "text", or chat "messages").',
)
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
    parsed = _toml_pairs(options, "--option", "max_logit_diff=0.01")
    data = load_dataset(data_file) if data_file else None
    with _progress() as progress:
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


@cli.command()
@click.argument("artifact")
@click.argument("message")
@click.option("--backend", required=True, help="Serving backend, e.g. onnx or torch.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A backend option, VALUE read as TOML when it parses (repeatable).",
)
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
        _toml_pairs(options, "--option", "intra_op_threads=2"),
        where="--option",
    )
    runner = load_runner(checked)
    try:
        prompt = runner.chat_prompt([ChatMessage("user", message)])
        [answer] = runner.generate([GenerationRequest(prompt=prompt, max_tokens=max_tokens)])
    finally:
        runner.close()
    out.print(answer.text)


def _toml_pairs(texts: tuple[str, ...], flag: str, example: str) -> dict[str, Any]:
    """``("a=1", "b=x")`` -> ``{"a": 1, "b": "x"}``: values read as TOML when they parse."""
    parsed: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise GptstoreError(f"{flag} {text!r}: write KEY=VALUE, e.g. {example}")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = value
    return parsed


# -- requirement flags --


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
        _emit_json(
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
        _emit_json(
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
        _emit_json(
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


def main() -> None:
    cli(prog_name="gptstore")


if __name__ == "__main__":
    main()
