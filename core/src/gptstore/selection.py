"""Selection: hard filters, then a scoring policy's scores, then ranking, with explanations.

A ranked candidate is explained by its score breakdown; an excluded card by the constraints it
fails. Policies that implement ``rank_sql`` are ranked inside SQLite, so a selection over a million
cards reads only the top ``limit`` cards into Python. :func:`make_scorer` builds a policy's scorer
from config.toml and the caller's options, the same way for the CLI and the HTTP API.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from attrs import fields_dict, frozen

from gptstore.catalog import Catalog, Entry
from gptstore.catalog.filters import violations
from gptstore.config import Config
from gptstore.converter import unstructure
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.manager import PluginManager, structure_options
from gptstore.protocols import Scorer, SqlRankable
from gptstore.records import ScoringPolicy
from gptstore.types import ModelCard, Requirement, Score

#: Most candidates a policy without ``rank_sql`` may score one by one in Python.
PYTHON_SCORING_LIMIT = 200_000


@frozen
class Candidate:
    """One card's place in a selection: ranked with a score, or excluded with reasons."""

    entry: Entry
    rank: int | None = None
    score: Score | None = None
    failures: tuple[str, ...] = ()

    @property
    def card(self) -> ModelCard:
        return self.entry.card


@frozen
class Selection:
    """The outcome of :func:`select_models`.

    :param matched: cards meeting every hard constraint (``ranked`` holds the best ``limit``).
    :param excluded: the first ``explain_excluded`` failing cards in catalog order (a sample,
        not the nearest misses), fewest failures first; ``explain_model`` explains any card.
    :param ranked_in: where the ranking ran: ``sql`` or ``python``.
    """

    requirement: Requirement
    policy: str
    ranked: tuple[Candidate, ...]
    excluded: tuple[Candidate, ...]
    matched: int
    total: int
    ranked_in: Literal["sql", "python"]


def _merge_options(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over``'s options over ``base``'s; two ``weights`` tables merge weight by weight (a
    request that sets one weight keeps the others config.toml sets)."""
    merged = {**base, **over}
    if isinstance(base.get("weights"), dict) and isinstance(over.get("weights"), dict):
        merged["weights"] = {**base["weights"], **over["weights"]}
    return merged


def make_scorer(
    manager: PluginManager,
    config: Config,
    policy: str,
    options: Mapping[str, Any] | None = None,
    *,
    weights: Mapping[str, float] | None = None,
    where: str = "$.options",
) -> tuple[str, Scorer]:
    """The registered name of ``policy`` and its scorer, built alike for every caller.

    The policy's options are config.toml's ``[policies.NAME]``, the caller's ``options`` over
    them, and ``weights`` over both (weights merge weight by weight). A problem is reported at
    ``$.policies.NAME`` when config.toml's table is wrong on its own, else at ``where``: the
    place the caller's options and weights came from (a request's ``$.options``, a CLI flag).
    """
    record = manager.get(ScoringPolicy, policy)
    configured = config.policies.get(record.name, {})
    caller = dict(options or {})
    if weights:
        if record.options_type is None or "weights" not in fields_dict(record.options_type):
            raise InvalidInput(where, [f"policy {record.name!r} takes no weights"])
        caller = _merge_options(caller, {"weights": dict(weights)})
    try:
        structured = structure_options(record, _merge_options(configured, caller), where=where)
    except GptstoreError:
        if configured:  # config.toml's own mistake is reported as such, at its place
            structure_options(record, configured, where=f"$.policies.{record.name}")
        raise
    return record.name, record.factory(structured)


def _sort_key(entry: Entry, score: Score) -> tuple[float, float, int]:
    # Ties: smaller model first, then catalog order, the same order as the SQL ranking.
    params = entry.card.parameters if entry.card.parameters is not None else math.inf
    return (-score.total, params, entry.id)


def select_models(
    catalog: Catalog,
    scorer: Scorer,
    requirement: Requirement,
    *,
    policy: str,
    limit: int = 10,
    explain_excluded: int = 20,
) -> Selection:
    """Rank the cards that meet ``requirement`` with ``scorer``; explain up to
    ``explain_excluded`` of the cards that do not."""
    ranking = scorer.rank_sql(requirement) if isinstance(scorer, SqlRankable) else None
    with catalog.read():
        total = catalog.count()
        if ranking is not None:
            ids, matched = catalog.ranked_ids(requirement, ranking, limit)
        else:
            ids = catalog.matching_ids(requirement)
            matched = len(ids)
            if matched > PYTHON_SCORING_LIMIT:
                raise GptstoreError(
                    f"policy {policy!r} scores in Python and {matched:,} models meet the "
                    f"requirement (limit {PYTHON_SCORING_LIMIT:,}); add constraints or use a "
                    "policy with rank_sql"
                )
        scored = [(entry, scorer.score(entry.card, requirement)) for entry in catalog.entries(ids)]
        scored.sort(key=lambda pair: _sort_key(pair[0], pair[1]))
        ranked = tuple(
            Candidate(entry, rank, score)
            for rank, (entry, score) in enumerate(scored[:limit], start=1)
        )
        excluded: list[Candidate] = []
        if explain_excluded > 0:
            for entry in catalog.entries(catalog.failing_ids(requirement, explain_excluded)):
                failures = violations(entry.card, requirement, listed=entry.listed)
                excluded.append(Candidate(entry, failures=tuple(failures)))
            excluded.sort(key=lambda c: (len(c.failures), c.card.uid))
    return Selection(
        requirement,
        policy,
        ranked,
        tuple(excluded),
        int(matched),
        int(total),
        "sql" if ranking is not None else "python",
    )


def explain_model(
    catalog: Catalog, scorer: Scorer, requirement: Requirement, model: str
) -> Candidate:
    """Where one model stands against ``requirement``: the constraints it fails, or (when it
    meets them all) its score and breakdown. ``model`` is ``source:model_id`` or a model id."""
    entry = catalog.resolve(model)
    failures = violations(entry.card, requirement, listed=entry.listed)
    if failures:
        return Candidate(entry, failures=tuple(failures))
    return Candidate(entry, score=scorer.score(entry.card, requirement))


def candidate_json(candidate: Candidate, *, card: bool = False) -> dict[str, Any]:
    """A candidate as the CLI's --json and the HTTP API show it."""
    data: dict[str, Any] = {
        "rank": candidate.rank,
        "uid": candidate.card.uid,
        "score": candidate.score.total if candidate.score else None,
        "breakdown": unstructure(candidate.score.breakdown) if candidate.score else [],
        "failures": list(candidate.failures),
    }
    if card:
        data["card"] = unstructure(candidate.card)
    return data


def selection_json(selection: Selection) -> dict[str, Any]:
    """A selection as the CLI's --json and the HTTP API show it."""
    return {
        "policy": selection.policy,
        "requirement": unstructure(selection.requirement),
        "total": selection.total,
        "matched": selection.matched,
        "ranked_in": selection.ranked_in,
        "ranked": [candidate_json(c, card=True) for c in selection.ranked],
        "excluded": [candidate_json(c) for c in selection.excluded],
    }
