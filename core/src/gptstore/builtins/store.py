"""The built-in ``store`` source: the store's own artifacts as catalog cards, so that models made
here (fetched, exported, quantized, and later pruned or fine-tuned) can be searched, selected and
explained like any other, with their lineage and the figures ``gptstore eval`` measured.

A card reads its artifact's files like the local source reads a folder; what a derived artifact
does not hold itself (README front matter, a parameter count for an ONNX export) comes from the
nearest artifact in its lineage that has it. Measured figures are metrics named
``FIGURE@BACKEND`` (``perplexity@onnx``, ``decode_tokens_per_s@torch``) with origin
``measured``: never mixed up with what a model card reports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from gptstore import hookimpl
from gptstore.artifacts import MANIFEST, ArtifactStore
from gptstore.builtins.local import matching
from gptstore.config import Store
from gptstore.errors import GptstoreError, NotFound
from gptstore.modelfiles import (
    architecture_tasks,
    as_tuple,
    context_length,
    count_parameters,
    parse_model_index,
    read_config,
    read_readme,
    weight_files,
)
from gptstore.protocols import Refusal
from gptstore.records import ModelSource
from gptstore.types import Artifact, Measurement, Metric, ModelCard, SearchQuery, SourceStatus

SOURCE = "store"


def _revision(artifact: Artifact) -> str:
    """Changes when the artifact's files change (its manifest's hashes)."""
    files = json.dumps(artifact.manifest.files, sort_keys=True).encode()
    return hashlib.sha256(files).hexdigest()[:16]


def _description(artifact: Artifact) -> str:
    manifest = artifact.manifest
    if manifest.step is not None:
        return f"{manifest.kind} artifact made from {manifest.parent} by {manifest.step.strategy}"
    return f"{manifest.kind} artifact imported from {manifest.origin or 'a folder'}"


def card_of(artifact: Artifact, lineage: list[Artifact]) -> ModelCard:
    """The card of ``artifact``; ``lineage`` is it and its ancestors, nearest first."""
    with_config = next((a for a in lineage if (a.path / "config.json").is_file()), None)
    config = read_config(with_config.path) if with_config else {}
    meta: dict[str, object] = {}
    for ancestor in lineage:
        meta, _text = read_readme(ancestor.path)
        if meta:
            break
    own_weights = weight_files(artifact.path)
    weighed = next((a for a in lineage if weight_files(a.path)), None)
    parameters, _dtype = count_parameters(weight_files(weighed.path)) if weighed else (None, None)
    # Only the artifact's own weights say its dtype: an int8 export's ancestor is float32.
    dtype = count_parameters(own_weights)[1] if own_weights else None
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if architectures else None
    reported = parse_model_index(meta.get("model-index"))
    # One figure per name: the latest (perplexity measured on two datasets is one figure that
    # filters and explanations must agree on).
    latest: dict[str, Measurement] = {}
    for m in sorted(
        artifact.manifest.measured, key=lambda m: m.measured_at or datetime.min.replace(tzinfo=UTC)
    ):
        latest[f"{m.name}@{m.backend}"] = m
    measured = tuple(
        Metric(name=name, value=m.value, kind=m.name, dataset=m.data, origin="measured")
        for name, m in latest.items()
    )
    license_value = next(iter(as_tuple(meta.get("license"))), None)
    return ModelCard(
        source=SOURCE,
        model_id=artifact.id,
        revision=_revision(artifact),
        name=artifact.id,
        description=_description(artifact),
        architecture=architecture,
        parameters=parameters,
        dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in artifact.path.rglob("*") if p.is_file()),
        context_length=context_length(config),
        tasks=as_tuple(meta.get("pipeline_tag")) or architecture_tasks(architecture),
        languages=as_tuple(meta.get("language")),
        license=str(license_value) if license_value else None,
        tags=(artifact.manifest.kind, *(["derived"] if artifact.manifest.parent else [])),
        base_model=artifact.manifest.parent,
        metrics=(*reported, *measured),
        created_at=artifact.manifest.created_at,
        updated_at=max(
            (m.measured_at for m in artifact.manifest.measured if m.measured_at),
            default=artifact.manifest.created_at,
        ),
        location=str(artifact.path),
    )


class StoreSource:
    """The artifacts of this store home."""

    def __init__(self, _options: None = None) -> None:
        self.artifacts = ArtifactStore(Store().artifacts_dir)

    def search(self, query: SearchQuery) -> Iterator[ModelCard | Refusal]:
        return matching(self._scan(), query)

    def _scan(self) -> Iterator[ModelCard | Refusal]:
        for artifact in self.artifacts.list():
            try:
                yield card_of(artifact, self.artifacts.lineage(artifact))
            except GptstoreError as exc:  # one broken manifest must not hide the others
                yield Refusal(artifact.id, str(exc))

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        artifact = self.artifacts.find(model_id)
        if artifact is None:
            raise NotFound(f"no artifact {model_id!r} in this store")
        if revision is not None and revision != _revision(artifact):
            raise GptstoreError(
                f"artifact {model_id!r} changed since it was synced; run `gptstore sync store`"
            )
        target = dest / model_id
        shutil.copytree(artifact.path, target, ignore=shutil.ignore_patterns(MANIFEST))
        return target

    def status(self) -> SourceStatus:
        count = len(self.artifacts.list())
        return SourceStatus(True, f"{count} artifact(s) in {self.artifacts.root}")


@hookimpl
def gptstore_model_sources() -> Iterator[ModelSource]:
    yield ModelSource(
        name="store",
        factory=StoreSource,
        description="This store's own artifacts, with lineage and measured figures",
    )
