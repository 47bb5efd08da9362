"""The store home (``$GPTSTORE_HOME``, default ``~/.gptstore``) and its ``config.toml``.

.. code-block:: toml

    [sources.local]
    paths = ["~/models"]          # folders the built-in ``local`` source scans

    [sources.hf]
    enabled = false               # any source can be switched off

    [policies.balanced]
    weights = { quality = 0.4, size = 0.3, popularity = 0.15, recency = 0.15 }

    [server]                      # and [deployments.NAME]: read by ``gptstore serve``
    anonymous_inference = true
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from attrs import Factory, frozen

from gptstore.converter import structure
from gptstore.errors import InvalidInput
from gptstore.files import atomic_write

CONFIG_FILE = "config.toml"
CATALOG_FILE = "catalog.db"


def store_home() -> Path:
    """``$GPTSTORE_HOME`` when set, else ``~/.gptstore``."""
    return Path(os.environ.get("GPTSTORE_HOME") or "~/.gptstore").expanduser()


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; InvalidInput naming the file when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(str(path), [f"cannot read it: {exc.strerror or exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(str(path), [f"not valid TOML: {exc}"]) from None


@frozen(kw_only=True)
class Config:
    """The parsed ``config.toml``: a raw table per source and per policy, and the server's tables.

    Each source or policy table is checked by the plugin that owns it (its record's
    ``options_type``); ``[server]`` and ``[deployments.NAME]`` by ``gptstore serve``.
    """

    sources: dict[str, dict[str, Any]] = Factory(dict)
    policies: dict[str, dict[str, Any]] = Factory(dict)
    server: dict[str, Any] = Factory(dict)
    deployments: dict[str, dict[str, Any]] = Factory(dict)

    def source_enabled(self, name: str) -> bool:
        return self.sources.get(name, {}).get("enabled", True) is not False

    def source_options(self, name: str) -> dict[str, Any]:
        return {k: v for k, v in self.sources.get(name, {}).items() if k != "enabled"}


class Store:
    """The files of one store home."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or store_home()).expanduser()

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def catalog_path(self) -> Path:
        return self.home / CATALOG_FILE

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def deployments_dir(self) -> Path:
        """Deployments created or changed through the HTTP API, one JSON record each."""
        return self.home / "deployments"

    @property
    def jobs_dir(self) -> Path:
        """Optimization jobs started through the HTTP API, a folder each."""
        return self.home / "jobs"

    @property
    def data_dir(self) -> Path:
        """Data files a job sent over HTTP may name (training or calibration examples)."""
        return self.home / "data"

    @property
    def recipes_dir(self) -> Path:
        """Recipe files a job sent over HTTP may name (``NAME.toml``)."""
        return self.home / "recipes"

    def read_raw_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            return {}
        return read_toml(self.config_path)

    def config(self) -> Config:
        return structure(self.read_raw_config(), Config, what=str(self.config_path))

    def write_raw_config(self, data: dict[str, Any]) -> None:
        """Check ``data`` as a Config, then replace config.toml atomically."""
        structure(data, Config, what="configuration")
        atomic_write(self.config_path, tomli_w.dumps(data))
