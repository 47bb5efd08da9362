"""The built-in scoring policies: ``balanced``, ``smallest`` and ``best-quality``.

Each scores in Python (with a breakdown, for explanations) and ranks in SQL (``rank_sql``) with
expressions built from the same criteria in :mod:`gptstore.scoring`, so both orders agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from attrs import Factory, field, frozen

from gptstore import hookimpl
from gptstore.errors import InvalidInput
from gptstore.protocols import SqlRanking
from gptstore.records import ScoringPolicy
from gptstore.scoring import (
    CRITERIA,
    epoch_days,
    quality_part,
    quality_sql,
    size_part,
    size_sql,
    weighted,
    weighted_sql,
)
from gptstore.types import Criterion, ModelCard, Requirement, Score

#: The largest weight (weights are relative: only their ratios matter).
MAX_WEIGHT = 1000.0
DEFAULT_WEIGHTS = {"quality": 0.4, "size": 0.3, "popularity": 0.15, "recency": 0.15}


def _check_weights(_instance: Any, _attribute: Any, weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(CRITERIA))
    if unknown:
        raise ValueError(
            f"unknown weight(s) {', '.join(unknown)}; criteria are {', '.join(CRITERIA)}"
        )
    wrong = sorted(name for name, w in weights.items() if not 0 <= w <= MAX_WEIGHT)
    if wrong:  # NaN fails this too
        raise ValueError(f"weight(s) of {', '.join(wrong)} must lie in 0..{MAX_WEIGHT:g}")


@frozen
class BalancedOptions:
    """``[policies.balanced]``: the weight of each criterion (missing ones keep their default)."""

    weights: dict[str, float] = field(default=Factory(dict), validator=_check_weights)


class Balanced:
    """Weighted sum of quality, size efficiency against the budget, popularity and recency."""

    def __init__(self, options: BalancedOptions | None = None) -> None:
        self.weights = {**DEFAULT_WEIGHTS, **(options.weights if options else {})}
        if not any(self.weights.values()):
            raise InvalidInput(
                "balanced policy weights",
                ["every weight is 0; give at least one criterion a positive weight"],
            )
        self.now_days = epoch_days(datetime.now(UTC)) or 0.0

    def _extra(self, name: str) -> dict[str, Any]:
        return {"now_days": self.now_days} if name == "recency" else {}

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        parts = [
            (name, weight, CRITERIA[name][0](card, requirement, **self._extra(name)))
            for name, weight in self.weights.items()
        ]
        total, breakdown = weighted(parts)
        return Score(total, breakdown)

    def rank_sql(self, requirement: Requirement) -> SqlRanking:
        sql = weighted_sql(
            [
                (weight, CRITERIA[name][1](requirement, **self._extra(name)))
                for name, weight in self.weights.items()
            ]
        )
        return SqlRanking(sql.expression, sql.params)


class Smallest:
    """The smallest model that meets every hard constraint ranks first."""

    def __init__(self, _options: None = None) -> None:
        self.unbounded = Requirement()

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        # Always the log-scale size: monotonic in the parameter count whatever the budget.
        size = size_part(card, self.unbounded)
        budget = size_part(card, requirement)
        return Score(size.value, (Criterion("size", size.value, 1.0, budget.detail),))

    def rank_sql(self, requirement: Requirement) -> SqlRanking:
        sql = size_sql(self.unbounded)
        return SqlRanking(sql.expression, sql.params)


class BestQuality:
    """Highest quality first (the requirement's metrics when it names some, else all reported)."""

    def __init__(self, _options: None = None) -> None:
        pass

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        quality = quality_part(card, requirement)
        return Score(quality.value, (Criterion("quality", quality.value, 1.0, quality.detail),))

    def rank_sql(self, requirement: Requirement) -> SqlRanking:
        sql = quality_sql(requirement)
        return SqlRanking(sql.expression, sql.params)


@hookimpl
def gptstore_scoring_policies() -> Iterator[ScoringPolicy]:
    yield ScoringPolicy(
        name="balanced",
        factory=Balanced,
        options_type=BalancedOptions,
        description="Weighted quality, size against the budget, popularity and "
        "recency (weights in [policies.balanced])",
    )
    yield ScoringPolicy(
        name="smallest",
        factory=Smallest,
        description="The smallest model meeting every hard constraint",
    )
    yield ScoringPolicy(
        name="best-quality",
        factory=BestQuality,
        description="The highest reported quality (the requirement's metrics when it names some)",
    )
