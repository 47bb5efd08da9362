"""Deployments created or changed through the HTTP API, kept in the store so they survive a
restart: one JSON file per deployment in ``$GPTSTORE_HOME/deployments/``, each replaced
atomically (a temporary file renamed over it), so a process killed while writing leaves the
previous record whole."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gptstore.files import atomic_write

log = logging.getLogger("gptstore.server")


class DeploymentRecords:
    """The records in ``folder`` (names are checked deployment names: never a path)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def save(self, name: str, record: dict[str, Any]) -> None:
        atomic_write(self._path(name), json.dumps(record, indent=1, sort_keys=True) + "\n")

    def remove(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def load(self) -> dict[str, dict[str, Any]]:
        """Every readable record by name; one that cannot be read is reported and left alone."""
        records: dict[str, dict[str, Any]] = {}
        if not self.folder.is_dir():
            return records
        for path in sorted(self.folder.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temporary file of a write that never finished
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("deployment record %s cannot be read (%s); it is skipped", path, exc)
                continue
            if isinstance(record, dict):
                records[path.stem] = record
        return records
