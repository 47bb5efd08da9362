"""The built-in ``local`` model source: Hugging Face format folders on this machine."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from attrs import field, frozen

from gptstore import hookimpl
from gptstore.errors import GptstoreError, InvalidInput, NotFound, RefusedModel
from gptstore.modelfiles import (
    PICKLE_SUFFIXES,
    architecture_tasks,
    as_tuple,
    check_weights,
    context_length,
    count_parameters,
    folder_times,
    inside,
    parse_model_index,
    read_config,
    read_readme,
)
from gptstore.protocols import Refusal
from gptstore.records import ModelSource
from gptstore.types import ModelCard, SearchQuery, SourceStatus, str_tuple


@frozen
class LocalOptions:
    """``[sources.local]`` in config.toml.

    :param paths: folders to scan; each model is a sub-folder holding config.json.
    :param max_depth: how many folder levels below each path to look for models.
    """

    paths: tuple[str, ...] = field(default=(), converter=str_tuple)
    max_depth: int = 3


def _revision(folder: Path, weights: list[Path]) -> str:
    """A fingerprint that changes when config or weights change, without hashing all weights."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weights:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def read_card(folder: Path, model_id: str, source: str = "local") -> ModelCard:
    """Build the card of one HF-format folder from its files' metadata.

    :raises RefusedModel: pickle-only weights, or no weights.
    :raises InvalidInput: missing or unreadable config.json, broken headers or front matter.
    """
    config = read_config(folder)
    weights = check_weights(folder)
    meta, description = read_readme(folder)
    parameters, dtype = count_parameters(weights)
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else None
    files = [p for p in folder.iterdir() if p.is_file()]
    created, updated = folder_times([*weights, folder / "config.json"])
    license_value = next(iter(as_tuple(meta.get("license"))), None)
    if license_value == "other" and meta.get("license_name"):
        license_value = str(meta["license_name"])
    return ModelCard(
        source=source,
        model_id=model_id,
        revision=_revision(folder, weights),
        name=str(meta.get("model_name") or model_id),
        description=description,
        architecture=architecture,
        parameters=parameters,
        dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in files),
        context_length=context_length(config),
        tasks=as_tuple(meta.get("pipeline_tag")) or architecture_tasks(architecture),
        languages=as_tuple(meta.get("language")),
        license=str(license_value) if license_value else None,
        tags=as_tuple(meta.get("tags")),
        base_model=next(iter(as_tuple(meta.get("base_model"))), None),
        metrics=parse_model_index(meta.get("model-index")),
        created_at=created,
        updated_at=updated,
        location=str(folder),
    )


def matches(card: ModelCard, query: SearchQuery) -> bool:
    """Whether a card answers a query: its task, and every word of its text (case-insensitive)."""
    if query.task and query.task.lower() not in card.tasks:
        return False
    if query.text:
        haystack = " ".join((card.model_id, card.name, card.description, *card.tags)).lower()
        return all(word in haystack for word in query.text.lower().split())
    return True


def matching(
    items: Iterable[ModelCard | Refusal], query: SearchQuery
) -> Iterator[ModelCard | Refusal]:
    """``items`` without the cards that do not match ``query``, ending after ``query.limit``
    cards (so a lazy scan stops there); refusals pass through."""
    produced = 0
    for item in items:
        if isinstance(item, ModelCard):
            if not matches(item, query):
                continue
            produced += 1
        yield item
        if query.limit is not None and produced >= query.limit:
            return


class LocalSource:
    """Scans configured folders for HF-format model folders."""

    def __init__(self, options: LocalOptions | None) -> None:
        options = options or LocalOptions()
        self.roots = [Path(p).expanduser() for p in options.paths]
        self.max_depth = options.max_depth

    def _model_folders(self, root: Path) -> Iterator[Path]:
        pending = [(root, 0)]
        while pending:
            folder, depth = pending.pop()
            if (folder / "config.json").is_file():
                yield folder
                continue  # a model's own sub-folders (onnx/, checkpoints) are not models
            if depth < self.max_depth:
                children = sorted(
                    (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                    reverse=True,
                )
                pending.extend((child, depth + 1) for child in children)

    def search(self, query: SearchQuery) -> Iterator[ModelCard | Refusal]:
        return matching(self._scan(), query)

    def _scan(self) -> Iterator[ModelCard | Refusal]:
        seen: dict[str, Path] = {}
        for root in self.roots:
            if not root.is_dir():
                yield Refusal(str(root), "configured folder does not exist")
                continue
            for folder in self._model_folders(root):
                model_id = folder.relative_to(root).as_posix() if folder != root else root.name
                if model_id in seen:
                    yield Refusal(model_id, f"{folder} has the same id as {seen[model_id]}")
                    continue
                seen[model_id] = folder
                try:
                    card = read_card(folder, model_id)
                except (RefusedModel, InvalidInput) as exc:
                    yield Refusal(model_id, str(exc))
                    continue
                except (OSError, ValueError, TypeError, AttributeError) as exc:
                    # One unreadable folder must not stop the others from syncing.
                    yield Refusal(model_id, f"{folder}: unreadable: {type(exc).__name__}: {exc}")
                    continue
                yield card

    def _folder(self, model_id: str) -> tuple[Path, Path]:
        """(model folder, the root it is in) for an id; the id comes from users and requests,
        so it must name a model folder inside a configured root."""
        for root in self.roots:
            base = root.resolve()
            folder = base if model_id == root.name else (root / model_id).resolve()
            if folder.is_relative_to(base) and (folder / "config.json").is_file():
                return folder, base
        raise NotFound(
            f"local model {model_id!r} is not in any configured folder "
            f"({', '.join(map(str, self.roots)) or 'none configured'})"
        )

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        folder, root = self._folder(model_id)
        weights = check_weights(folder)
        current = _revision(folder, weights)
        if revision is not None and revision != current:
            raise GptstoreError(
                f"local model {model_id!r} changed since it was synced "
                f"(revision {revision}, now {current}); run `gptstore sync`"
            )
        target = dest / model_id.replace("/", "--")
        if target.exists():
            raise GptstoreError(f"cannot fetch {model_id!r}: {target} already exists")
        files = [
            p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix not in PICKLE_SUFFIXES
        ]
        # A symlink may point anywhere; copy only what stays inside the configured folder.
        outside = [p.name for p in files if not inside(p, root)]
        if outside:
            raise RefusedModel(
                f"{folder}: {', '.join(outside)} link(s) outside {root}; "
                "copy the files into the model folder"
            )
        target.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, target / path.name)
        return target

    def status(self) -> SourceStatus:
        if not self.roots:
            return SourceStatus(
                False,
                "no folders configured; add paths under [sources.local] "
                "in config.toml, or run `gptstore init --local-path DIR`",
            )
        missing = [str(r) for r in self.roots if not r.is_dir()]
        if missing:
            return SourceStatus(False, f"missing folder(s): {', '.join(missing)}")
        return SourceStatus(True, "scans " + ", ".join(map(str, self.roots)))


@hookimpl
def gptstore_model_sources() -> Iterator[ModelSource]:
    yield ModelSource(
        name="local",
        factory=LocalSource,
        options_type=LocalOptions,
        description="Hugging Face format model folders on this machine",
    )
