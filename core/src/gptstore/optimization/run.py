"""``gptstore optimize``: apply an optimization strategy to an artifact, producing a new one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from attrs import evolve

from gptstore.artifacts import ArtifactStore, check_artifact_id
from gptstore.converter import unstructure
from gptstore.errors import GptstoreError
from gptstore.manager import PluginManager, structure_options
from gptstore.records import OptimizationStrategy
from gptstore.types import Artifact, Dataset, OptimizationContext, RecipeStep

#: What ``RecipeStep.data`` records when a step was given no data (the strategy's default).
NO_DATA = "none"


def data_key(data: Dataset | None) -> str:
    """What a step's data is recorded as: its digest, or :data:`NO_DATA`."""
    return (data.digest if data else None) or NO_DATA


def made_same_way(
    artifact: Artifact, parent: str, strategy: str, options: dict[str, Any], data: str
) -> bool:
    """Whether ``artifact`` was made from ``parent`` by ``strategy`` with these (unstructured)
    options and data (:func:`data_key`). A manifest from before gptstore recorded the data
    never matches."""
    step = artifact.manifest.step
    return (
        artifact.manifest.parent == parent
        and step is not None
        and step.strategy == strategy
        and step.options == options
        and step.data == data
    )


def made_like(
    store: ArtifactStore, parent: str, strategy: str, options: dict[str, Any], data: str
) -> Artifact | None:
    """The oldest artifact made from ``parent`` as :func:`made_same_way` says; None when the
    store holds none."""
    for child in store.children().get(parent, []):
        if made_same_way(child, parent, strategy, options, data):
            return child
    return None


def optimize(
    manager: PluginManager,
    store: ArtifactStore,
    artifact_id: str,
    strategy: str,
    options: dict[str, Any] | None = None,
    *,
    data: Dataset | None = None,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    new_id: str | None = None,
) -> Artifact:
    """Derive a new artifact from ``artifact_id`` with ``strategy``; it lands in the store
    atomically, with its lineage, or not at all. With ``new_id``, an artifact of that id made
    from the same parent by the same strategy, options and data is reused."""
    record = manager.get(OptimizationStrategy, strategy)
    structured = structure_options(record, options, where="$.options")
    plain = unstructure(structured) if structured else {}
    parent = store.get(artifact_id)
    made_with = data_key(data)
    if new_id is not None:
        existing = store.find(check_artifact_id(new_id))
        if existing is not None:
            if not made_same_way(existing, parent.id, record.name, plain, made_with):
                raise GptstoreError(
                    f"artifact {new_id} exists and was made otherwise (another parent, strategy, "
                    "options or data); choose another id"
                )
            return existing
    staging = store.staging_dir()
    try:
        context = OptimizationContext(
            output_dir=staging, data=data or Dataset(), cancel_event=cancel or threading.Event()
        )
        if progress is not None:
            context.progress = progress
        result = record.factory(structured).apply(parent, context)
        if result.path.resolve() != staging.resolve():
            raise GptstoreError(
                f"strategy {record.name!r} returned {result.path}, not its output folder {staging}"
            )
        if result.manifest.parent != parent.id:
            raise GptstoreError(
                f"strategy {record.name!r} did not record {parent.id} as the "
                "parent; use gptstore.artifacts.derive_manifest"
            )
        step = result.manifest.step or RecipeStep(record.name, plain)
        manifest = evolve(result.manifest, step=evolve(step, data=made_with))
        if new_id:
            manifest = evolve(manifest, id=new_id)
        return store.commit(staging, manifest)
    finally:
        store.discard(staging)
