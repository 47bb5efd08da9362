"""What every ``gptstore`` command shares: the group, the store home and plugin manager, the
consoles, and turning user mistakes into one line.

Most of what is printed comes from elsewhere (model cards, plugin records and errors, file paths),
so rich reads no markup and no emoji codes in it: ``[beta]`` or ``:x:`` is printed as written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
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


def _stage(message: str) -> str:
    """A message with its numbers taken out (after its last ``: ``, which ends a label such as
    a recipe's ``step 2/4 lora``): ``step 3/100 loss 2.31`` and ``step 4/100 loss 2.29`` are one
    stage."""
    label, colon, text = message.rpartition(": ")
    return label + colon + re.sub(r"[-+]?\d[\d.,:e+-]*", "#", text)


@contextlib.contextmanager
def stage_progress(title: str) -> Iterator[Callable[[float, str], None]]:
    """A progress reporter for a long step: a bar with the share done, the current message (a
    training step's loss and ETA), and the time spent, on a terminal; and one line per stage
    (a message whose text, numbers aside, is new) wherever stderr goes, so a log shows what
    ran without a line per training step."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = progress.add_task(title, total=1.0)
    last: list[str] = []
    started = time.perf_counter()

    def report(fraction: float, message: str) -> None:
        stage = _stage(message)
        if not last or stage != last[0]:
            last[:] = [stage]
            progress.console.print(
                Text(f"[{time.perf_counter() - started:6.1f}s] {message}", style="dim")
            )
        progress.update(task, completed=min(max(fraction, 0.0), 1.0), description=message)

    with progress:
        yield report


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
