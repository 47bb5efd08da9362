"""Deployments: artifacts loaded on serving backends, by name."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime
from typing import Any

from attrs import frozen

from gptstore.artifacts import ArtifactStore
from gptstore.errors import GptstoreError, InvalidInput, NotFound
from gptstore.manager import PluginManager, structure_options
from gptstore.protocols import Runner
from gptstore.records import ServingBackend
from gptstore.server.batching import Batcher
from gptstore.types import Artifact

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_BATCH, MAX_QUEUE = 256, 100_000


def check_limits(name: str, max_batch: int, max_queue: int) -> None:
    """InvalidInput unless ``max_batch`` and ``max_queue`` lie in their ranges."""
    bounds = [
        f"{what} must lie in 1..{top}, got {value} @ $.{what}"
        for what, value, top in (
            ("max_batch", max_batch, MAX_BATCH),
            ("max_queue", max_queue, MAX_QUEUE),
        )
        if not 1 <= value <= top
    ]
    if bounds:
        raise InvalidInput(f"deployment {name!r}", bounds)


@frozen
class Deployment:
    name: str
    artifact: Artifact
    backend: str
    options: dict[str, Any]
    runner: Runner
    batcher: Batcher
    created_at: datetime


class Deployments:
    """The deployments of one server process (thread-safe)."""

    def __init__(self, manager: PluginManager, artifacts: ArtifactStore) -> None:
        self.manager = manager
        self.artifacts = artifacts
        self._items: dict[str, Deployment] = {}
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        artifact_id: str,
        backend: str,
        options: dict[str, Any] | None = None,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
    ) -> Deployment:
        """Load ``artifact_id`` on ``backend`` as deployment ``name``: requests are decoded in
        batches of up to ``max_batch`` rows, and at most ``max_queue`` wait (more get 429)."""
        if not _NAME.match(name):
            raise InvalidInput(
                "deployment name", [f"{name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-'"]
            )
        check_limits(name, max_batch, max_queue)
        with self._lock:
            if name in self._items:
                raise GptstoreError(f"deployment {name!r} already exists; delete it first")
        artifact = self.artifacts.get(artifact_id)
        record = self.manager.get(ServingBackend, backend)
        structured = structure_options(record, options, where="$.options")
        runner = record.factory().load(artifact, structured)
        batcher = Batcher(runner, name, max_batch=max_batch, max_queue=max_queue)
        deployment = Deployment(
            name, artifact, record.name, dict(options or {}), runner, batcher, datetime.now(UTC)
        )
        with self._lock:
            if name in self._items:  # created meanwhile by another request
                _stop(deployment)
                raise GptstoreError(f"deployment {name!r} already exists; delete it first")
            self._items[name] = deployment
        return deployment

    def get(self, name: str) -> Deployment:
        with self._lock:
            deployment = self._items.get(name)
            names = sorted(self._items)
        if deployment is None:
            raise NotFound(f"no deployment {name!r}; deployed: {', '.join(names) or 'none'}")
        return deployment

    def list(self) -> list[Deployment]:
        with self._lock:
            return sorted(self._items.values(), key=lambda d: d.name)

    def delete(self, name: str) -> None:
        with self._lock:
            deployment = self._items.pop(name, None)
        if deployment is None:
            raise NotFound(f"no deployment {name!r}")
        _stop(deployment)

    def close(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        for deployment in items:
            _stop(deployment)


def _stop(deployment: Deployment) -> None:
    deployment.batcher.close()
    deployment.runner.close()
