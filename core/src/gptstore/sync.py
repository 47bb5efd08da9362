"""``gptstore sync`` fills the catalog from every enabled model source; ``fetch_model`` brings one
model from its source into the store as an artifact."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from attrs import evolve

from gptstore.artifacts import ArtifactStore, hash_files, library_versions, new_artifact_id
from gptstore.catalog import Catalog, SourceSync
from gptstore.config import Config
from gptstore.errors import GptstoreError, UnknownName
from gptstore.manager import PluginManager, build
from gptstore.protocols import Refusal
from gptstore.records import ModelSource
from gptstore.types import Artifact, Manifest, ModelCard, SearchQuery

#: Called as progress(source name, cards listed so far).
Progress = Callable[[str, int], None]


def enabled_sources(
    manager: PluginManager, config: Config, names: tuple[str, ...] = ()
) -> dict[str, ModelSource]:
    """Registered sources not switched off in config (only ``names`` when given)."""
    records = manager.registrations(ModelSource)
    names = tuple(name.strip().lower() for name in names)
    for name in names:
        if name not in records:
            raise UnknownName("model source", name, list(records))
    return {
        name: record
        for name, record in records.items()
        if (name in names if names else config.source_enabled(name))
    }


def sync_catalog(
    catalog: Catalog,
    manager: PluginManager,
    config: Config,
    names: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> list[SourceSync]:
    """List every enabled source, then write all listings in one transaction.

    A source that fails keeps its cards as they were and reports its error; the others sync.
    Readers see the catalog before or after the sync, never in between.
    """
    listings: dict[str, tuple[list[ModelCard], list[Refusal], str, str | None]] = {}
    failures: dict[str, tuple[str, str]] = {}
    for name, record in enabled_sources(manager, config, names).items():
        started = datetime.now(UTC).isoformat()
        cards: list[ModelCard] = []
        refusals: list[Refusal] = []
        try:
            source = build(record, config.source_options(name), where=f"$.sources.{name}")
            status = source.status()
            # An offline source may list only part of what it offers (the hub's local cache):
            # its listing adds and updates cards but delists none.
            offline = None if status.online else status.message
            for item in source.search(SearchQuery()):
                if isinstance(item, Refusal):
                    refusals.append(item)
                    continue
                if not isinstance(item, ModelCard) or item.source != name:
                    # Checked here, not in the write transaction, so a broken source fails
                    # alone instead of rolling back every other source's sync.
                    raise GptstoreError(
                        f"source {name!r} produced {item!r:.80}; a source must yield ModelCard "
                        f"records with source={name!r} (or Refusal records)"
                    )
                cards.append(item)
                if progress:
                    progress(name, len(cards))
        except GptstoreError as exc:
            failures[name] = (str(exc), started)
            continue
        except Exception as exc:  # a broken source must not stop the others
            failures[name] = (f"{type(exc).__name__}: {exc}", started)
            continue
        listings[name] = (cards, refusals, started, offline)

    results: list[SourceSync] = []
    with catalog.write() as conn:
        for name, (cards, refusals, started, offline) in listings.items():
            result = catalog.replace_source(conn, name, cards, delist=offline is None)
            result = evolve(
                result, refused=tuple((r.model_id, r.reason) for r in refusals), offline=offline
            )
            catalog.record_sync(conn, result, started)
            results.append(result)
        for name, (error, started) in failures.items():
            result = SourceSync(name, error=error)
            catalog.record_sync(conn, result, started)
            results.append(result)
    return sorted(results, key=lambda r: r.source)


def fetch_model(
    manager: PluginManager,
    config: Config,
    card: ModelCard,
    store: ArtifactStore,
    artifact_id: str | None = None,
) -> Artifact:
    """Fetch ``card`` from its source, pinned to the card's revision, into ``store``.

    The files land in a staging folder and are renamed into place with their manifest (origin
    ``source:model_id@revision``, file hashes, library versions); a failure leaves the store as
    it was. With ``artifact_id``, an artifact of that id from the same origin is reused.
    """
    origin = f"{card.uid}@{card.revision or 'unpinned'}"
    if artifact_id is not None:
        existing = store.find(artifact_id)
        if existing is not None:
            if existing.manifest.origin != origin:
                raise GptstoreError(
                    f"artifact {artifact_id} exists with another origin "
                    f"({existing.manifest.origin}); choose another --id"
                )
            return existing
    record = manager.get(ModelSource, card.source)
    source = build(record, config.source_options(card.source), where=f"$.sources.{card.source}")
    staging = store.staging_dir()
    try:
        folder = source.fetch(card.model_id, card.revision, staging)
        if not folder.is_dir() or not folder.resolve().is_relative_to(staging.resolve()):
            raise GptstoreError(
                f"source {card.source!r} returned {folder}, not a folder under {staging}"
            )
        manifest = Manifest(
            id=artifact_id or new_artifact_id(card.model_id.replace("/", "--")),
            kind="hf",
            origin=origin,
            files=hash_files(folder),
            library_versions=library_versions(),
            created_at=datetime.now(UTC),
        )
        return store.commit(folder, manifest)
    finally:
        store.discard(staging)
