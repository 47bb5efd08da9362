"""The ``gptstore`` command, one module per command group:

- :mod:`~gptstore.cli.catalog`: plugins, sources, sync, search, show, select;
- :mod:`~gptstore.cli.artifacts`: fetch, artifacts, optimize, eval, lineage;
- :mod:`~gptstore.cli.serving`: serve, chat;
- :mod:`~gptstore.cli.config`: init, config;
- :mod:`~gptstore.cli.keys`: key (API keys and their hashes);
- :mod:`~gptstore.cli.quickstart`: quickstart (the main job, on SmolLM2, in one command).

Commands parse flags, call the same services as the HTTP API, and print. User mistakes (a bad
flag value, an unknown model or policy) print one line and exit 1; no traceback. Heavy libraries
are never imported here.
"""

from __future__ import annotations

from gptstore.cli import artifacts, catalog, config, keys, quickstart, serving
from gptstore.cli.base import cli

__all__ = ["artifacts", "catalog", "cli", "config", "keys", "main", "quickstart", "serving"]


def main() -> None:
    cli(prog_name="gptstore")
