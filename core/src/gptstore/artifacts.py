"""Artifacts on disk: model folders with a ``manifest.json`` that records their lineage.

An artifact is written to a temporary folder next to its final place and renamed into place, so a
crash never leaves half an artifact where the store looks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import evolve

from gptstore.converter import structure, unstructure
from gptstore.errors import InvalidInput, NotFound
from gptstore.files import atomic_write
from gptstore.types import Artifact, GateCheck, Manifest, Measurement, RecipeStep

MANIFEST = "manifest.json"
#: Folders of artifacts being made (``.staging-<random>``, each with a ``.lock`` file beside it);
#: the store never lists them.
STAGING_PREFIX = ".staging-"
#: Artifact ids: 1-128 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit,
#: without ".." (an id never names a path outside the store).
ARTIFACT_ID_PATTERN = r"^(?!.*\.\.)[a-z0-9][a-z0-9._-]{0,127}$"
_ID = re.compile(ARTIFACT_ID_PATTERN)
# Libraries whose versions decide whether a derived model can be reproduced.
_TRACKED_LIBRARIES = (
    "gptstore",
    "torch",
    "transformers",
    "peft",
    "optimum-onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "safetensors",
    "tokenizers",
)


#: A staging folder in the older layout (no lock file) untouched this long is a leftover.
STALE_UNLOCKED_S = 24 * 3600
#: Staging folder -> the descriptor of its lock file, held by this process.
_HELD: dict[str, int] = {}


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


def _lock(handle: int) -> bool:
    """Take an exclusive lock on an open file without waiting; whether it was taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no sweeping of others' folders
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _unheld(lock: Path) -> bool:
    """Whether no process holds ``lock`` (its writer is gone)."""
    try:
        handle = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        return _lock(handle)
    finally:
        os.close(handle)  # closing drops the lock taken here


def _release(staging: Path) -> None:
    handle = _HELD.pop(str(staging), None)
    if handle is not None:
        _lock_path(staging).unlink(missing_ok=True)
        os.close(handle)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file under ``folder`` except the manifest."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def new_artifact_id(stem: str) -> str:
    """A fresh id: a slug of ``stem`` plus a random suffix (``smollm2-135m.prune-3f9a0c1d``)."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "artifact"
    return f"{slug[:100]}-{uuid.uuid4().hex[:8]}"


def check_artifact_id(artifact_id: str) -> str:
    """Refuse ids that could name a path outside the store (``../x``, ``a/b``)."""
    if not _ID.match(artifact_id):
        raise InvalidInput(
            "artifact id",
            [
                f"{artifact_id!r} is not an artifact id; ids are 1-128 characters of a-z, 0-9, "
                "'.', '_' or '-'"
            ],
        )
    return artifact_id


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True))


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise NotFound(f"{folder} has no {MANIFEST}; it is not a gptstore artifact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvalidInput(str(path), [f"not valid JSON: {exc}"]) from None
    return structure(data, Manifest, what=str(path))


def derive_manifest(
    parent: Artifact,
    folder: Path,
    *,
    strategy: str,
    options: dict[str, Any],
    kind: str | None = None,
    data_digest: str | None = None,
    metrics_before: dict[str, float] | None = None,
    metrics_after: dict[str, float] | None = None,
) -> Manifest:
    """The manifest of a new artifact in ``folder`` made from ``parent`` by one recipe step."""
    return Manifest(
        id=new_artifact_id(f"{parent.id.rsplit('-', 1)[0]}.{strategy}"),
        kind=kind or parent.manifest.kind,
        parent=parent.id,
        origin=parent.manifest.origin,
        step=RecipeStep(strategy, options),
        data_digest=data_digest,
        metrics_before=metrics_before or {},
        metrics_after=metrics_after or {},
        files=hash_files(folder),
        library_versions=library_versions(),
        created_at=datetime.now(UTC),
    )


#: The longest lineage walked: a manifest chain longer than this is a cycle or a broken store.
MAX_LINEAGE = 1000


class ArtifactStore:
    """The ``artifacts/`` folder of a store home: one sub-folder per artifact id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactStore:
        """The store that holds ``artifact`` (so a backend can find its parent)."""
        return cls(artifact.path.parent)

    def parent(self, artifact: Artifact) -> Artifact | None:
        """The artifact ``artifact`` was derived from (None for an imported model);
        NotFound when the manifest names a parent the store no longer holds."""
        parent = artifact.manifest.parent
        if parent is None:
            return None
        found = self.find(parent)
        if found is None:
            raise NotFound(
                f"artifact {artifact.id} was derived from {parent}, which is not in {self.root}"
            )
        return found

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """``artifact`` and its ancestors, nearest first, down to the imported model."""
        chain = [artifact]
        seen = {artifact.id}
        while (parent := self.parent(chain[-1])) is not None:
            if parent.id in seen or len(chain) >= MAX_LINEAGE:
                raise InvalidInput(
                    f"lineage of {artifact.id}",
                    [f"{parent.id} appears twice or the chain is too long; a manifest is broken"],
                )
            seen.add(parent.id)
            chain.append(parent)
        return chain

    def staging_dir(self) -> Path:
        """An empty temporary folder on the same file system, for a new artifact's files.

        This process holds an exclusive lock on a file beside it (``<folder>.lock``) until the
        folder is committed or discarded, so a folder whose writer is gone (killed mid-step)
        can be told from one in use, by any process on any machine sharing the store: the next
        staging folder made here sweeps such leftovers first."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sweep()
        while True:
            folder = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex[:16]}"
            lock = _lock_path(folder)
            try:
                handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            except FileExistsError:
                continue
            _lock(handle)
            _HELD[str(folder)] = handle
            folder.mkdir()
            return folder

    def sweep(self) -> list[Path]:
        """Remove staging folders no process holds (left by a killed step), and folders in the
        older, unlocked layout untouched for a day; returns what was removed."""
        removed = []
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            if path.suffix == ".lock" or str(path) in _HELD:
                continue
            lock = _lock_path(path)
            if lock.is_file():
                if not _unheld(lock):
                    continue
            elif time.time() - path.stat().st_mtime < STALE_UNLOCKED_S:
                continue
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(path)
        for lock in self.root.glob(f"{STAGING_PREFIX}*.lock"):
            if not lock.with_suffix("").exists() and _unheld(lock):
                lock.unlink(missing_ok=True)
        return removed

    def remove(self, artifact: Artifact) -> None:
        """Delete ``artifact`` (its folder leaves the store in one rename, then is removed);
        refused while other artifacts are derived from it."""
        derived = self.children().get(artifact.id, [])
        if derived:
            raise InvalidInput(
                "artifact",
                [
                    f"{artifact.id} has derived artifacts ({', '.join(a.id for a in derived)}); "
                    "remove those first"
                ],
            )
        trash = self.staging_dir()
        os.replace(artifact.path, trash / "removed")
        self.discard(trash)

    def commit(self, staging: Path, manifest: Manifest) -> Artifact:
        """Write the manifest into ``staging`` and rename it to ``artifacts/<id>``."""
        target = self.root / check_artifact_id(manifest.id)
        if target.exists():
            raise InvalidInput("artifact", [f"{manifest.id} already exists in {self.root}"])
        write_json_atomic(staging / MANIFEST, unstructure(manifest))
        os.replace(staging, target)
        _release(staging)
        return Artifact(target, manifest)

    def children(self) -> dict[str, list[Artifact]]:
        """Parent id -> the artifacts derived from it, oldest first."""
        found: dict[str, list[Artifact]] = {}
        for artifact in self.list():
            if artifact.manifest.parent is not None:
                found.setdefault(artifact.manifest.parent, []).append(artifact)
        for derived in found.values():
            derived.sort(key=lambda a: (a.manifest.created_at is None, a.manifest.created_at, a.id))
        return found

    def record(
        self,
        artifact: Artifact,
        measurements: Sequence[Measurement] = (),
        gates: Sequence[GateCheck] = (),
    ) -> Artifact:
        """``artifact`` with ``measurements`` in its manifest (replacing older ones of the same
        figure, backend and data) and ``gates`` (replacing older checks of the same figure by the
        same recipe),
        written atomically; its files are not touched."""
        keys = {m.key for m in measurements}
        kept = [m for m in artifact.manifest.measured if m.key not in keys]
        checked = {(g.metric, g.recipe) for g in gates}
        old_gates = [g for g in artifact.manifest.gates if (g.metric, g.recipe) not in checked]
        manifest = evolve(
            artifact.manifest,
            measured=(*kept, *measurements),
            gates=(*old_gates, *gates),
        )
        write_json_atomic(artifact.path / MANIFEST, unstructure(manifest))
        return Artifact(artifact.path, manifest)

    def discard(self, staging: Path) -> None:
        """Remove a staging folder (and release it)."""
        shutil.rmtree(staging, ignore_errors=True)
        _release(staging)

    def get(self, artifact_id: str) -> Artifact:
        folder = self.root / check_artifact_id(artifact_id)
        if not folder.is_dir():
            raise NotFound(f"no artifact {artifact_id!r} in {self.root}")
        return Artifact(folder, read_manifest(folder))

    def find(self, artifact_id: str) -> Artifact | None:
        """The artifact, or None when there is none of that id."""
        folder = self.root / check_artifact_id(artifact_id)
        return Artifact(folder, read_manifest(folder)) if folder.is_dir() else None

    def list(self) -> list[Artifact]:
        if not self.root.is_dir():
            return []
        return [
            Artifact(p, read_manifest(p))
            for p in sorted(self.root.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        ]


def tree_of(artifact: Artifact, children: dict[str, list[Artifact]]) -> dict[str, Any]:
    """``artifact`` and everything derived from it (``children``: as
    :meth:`ArtifactStore.children` gives them), as nested dicts: each with its kind, origin,
    recipe step, data digest, figures before and after, measurements, gates and ``derived``."""
    manifest = artifact.manifest
    return {
        "id": artifact.id,
        "kind": manifest.kind,
        "origin": manifest.origin,
        "step": unstructure(manifest.step),
        "data_digest": manifest.data_digest,
        "metrics_before": manifest.metrics_before,
        "metrics_after": manifest.metrics_after,
        "measured": unstructure(manifest.measured),
        "gates": unstructure(manifest.gates),
        "derived": [tree_of(child, children) for child in children.get(artifact.id, [])],
    }
