"""``gptstore init`` and ``gptstore config``: the store home and its config.toml."""

from __future__ import annotations

from pathlib import Path

import click
import tomli_w
from rich.text import Text

from gptstore.catalog import Catalog
from gptstore.cli.base import App, cli, err, out
from gptstore.config_edit import set_config_value
from gptstore.errors import GptstoreError


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
    value, warning = set_config_value(app.store, app.manager, key, value)
    out.print(f"{key} = {tomli_w.dumps({'v': value}).removeprefix('v = ').strip()}")
    if warning:
        err.print(Text(f"warning: {warning}", style="yellow"))
