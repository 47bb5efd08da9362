"""What every ``gptstore`` command shares: the group, the store home and plugin manager, the
consoles, and turning user mistakes into one line.

Most of what is printed comes from elsewhere (model cards, plugin records and errors, file paths),
so rich reads no markup and no emoji codes in it: ``[beta]`` or ``:x:`` is printed as written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tomllib
import warnings
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.text import Text

from gptstore import __version__
from gptstore.catalog import Catalog
from gptstore.config import Config, Store
from gptstore.errors import GptstoreError
from gptstore.manager import PluginLoadWarning, PluginManager, make_plugin_manager

F = TypeVar("F", bound=Callable[..., Any])

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


def progress_line() -> Progress:
    """A transient spinner line on stderr; its text (source names, a strategy's messages) is
    printed as written, never read as markup."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}", markup=False), console=err, transient=True
    )


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def option_pairs(what: str) -> Callable[[F], F]:
    """The repeatable ``--option KEY=VALUE`` flag of a plugin's options (``what``: "strategy",
    "backend"), read with :func:`toml_pairs`."""
    return click.option(
        "--option",
        "options",
        multiple=True,
        metavar="KEY=VALUE",
        help=f"A {what} option, VALUE read as TOML when it parses (repeatable).",
    )


def data_option(purpose: str) -> Callable[[F], F]:
    """The ``--data FILE`` flag: a text file or JSONL, read with ``load_dataset``."""
    return click.option(
        "--data",
        "data_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f'{purpose}: a text file (one example per line) or JSONL (objects with "text", '
        'or chat "messages").',
    )


def toml_pairs(texts: tuple[str, ...], flag: str, example: str) -> dict[str, Any]:
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
