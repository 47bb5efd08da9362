"""Scoring criteria shared by the built-in policies, each in two forms that agree:
a Python function (value and a readable detail, for explanations) and an SQL expression over the
catalog's ``cards`` table (for ranking a million cards inside SQLite).

Every criterion lies in 0..1 where 1 is best.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from attrs import frozen

from gptstore.types import Criterion, ModelCard, Requirement
from gptstore.units import DTYPE_BYTES, format_bytes, format_count

#: Days after which a model's recency counts 0 (three years).
RECENCY_HORIZON_DAYS = 1095.0
#: Downloads at which popularity counts 1 (log scale).
POPULARITY_SATURATION_LOG10 = 7.0
#: Parameter count whose size counts 0 when no budget is given (log scale).
SIZE_LOG10_CEILING = 12.0
#: Bytes per weight assumed when a card's dtype is unknown.
UNKNOWN_DTYPE_BYTES = 4.0


def clamp(value: float) -> float:
    return max(0.0, min(1.0, value))


def epoch_days(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() / 86400.0


def size_log(parameters: int | None) -> float | None:
    return math.log10(max(parameters, 1)) if parameters is not None else None


def popularity_score(downloads: int) -> float:
    return clamp(math.log10(1 + max(downloads, 0)) / POPULARITY_SATURATION_LOG10)


@frozen
class Part:
    """A criterion's value with its detail, and the same value as SQL."""

    value: float
    detail: str


@frozen
class SqlPart:
    expression: str
    params: tuple[Any, ...] = ()


# -- size -----------------------------------------------------------------------------------------


def _budget_terms(card: ModelCard | None, req: Requirement) -> list[tuple[str, Any]]:
    """(kind, data) for each limit that applies: max_params and/or the memory budget."""
    terms: list[tuple[str, Any]] = []
    if req.max_params:
        terms.append(("params", req.max_params))
    if req.memory_budget:
        terms.append(("memory", req.memory_budget))
    return terms


def size_part(card: ModelCard, req: Requirement) -> Part:
    p = card.parameters
    if p is None:
        return Part(0.0, "parameter count unknown")
    used: list[tuple[float, str]] = []
    for kind, limit in _budget_terms(card, req):
        if kind == "params":
            used.append(
                (p / float(limit), f"{format_count(p)} of {format_count(limit)} parameters")
            )
        else:
            per_weight = (
                DTYPE_BYTES[req.dtype] if req.dtype else (card.dtype_bytes or UNKNOWN_DTYPE_BYTES)
            )
            weights = p * per_weight
            at = req.dtype or card.dtype or "float32"
            used.append(
                (
                    weights / float(limit),
                    f"{format_bytes(weights)} of {format_bytes(limit)} at {at}",
                )
            )
    if used:
        fraction, detail = max(used)
        return Part(clamp(1.0 - fraction), f"{detail} ({clamp(1.0 - fraction):.0%} headroom)")
    log = size_log(p) or 0.0
    return Part(clamp(1.0 - log / SIZE_LOG10_CEILING), f"{format_count(p)} parameters, no budget")


def size_sql(req: Requirement) -> SqlPart:
    terms: list[str] = []
    params: list[Any] = []
    for kind, limit in _budget_terms(None, req):
        if kind == "params":
            terms.append("c.parameters / ?")
            params.append(float(limit))
        elif req.dtype:
            terms.append("c.parameters * ? / ?")
            params.extend((DTYPE_BYTES[req.dtype], float(limit)))
        else:
            terms.append(f"c.parameters * coalesce(c.dtype_bytes, {UNKNOWN_DTYPE_BYTES}) / ?")
            params.append(float(limit))
    if terms:
        used = terms[0] if len(terms) == 1 else f"max({', '.join(terms)})"
        body = f"max(0.0, min(1.0, 1.0 - {used}))"
    else:
        body = f"max(0.0, min(1.0, 1.0 - c.size_log / {SIZE_LOG10_CEILING}))"
    return SqlPart(f"(CASE WHEN c.parameters IS NULL THEN 0.0 ELSE {body} END)", tuple(params))


# -- quality --------------------------------------------------------------------------------------


def quality_part(card: ModelCard, req: Requirement) -> Part:
    if req.metric_floors:
        readings = []
        total = 0.0
        for floor in req.metric_floors:
            metric = card.metric(floor.name)
            value = metric.normalized if metric and metric.normalized is not None else 0.0
            total += value
            readings.append(
                f"{floor.name} {value:.2f}" + (f" {metric.origin}" if metric else " missing")
            )
        return Part(total / len(req.metric_floors), ", ".join(readings))
    quality = card.quality
    if quality is None:
        return Part(0.0, "no reported quality metrics")
    count = sum(1 for m in card.metrics if m.normalized is not None)
    names = ", ".join(m.name for m in card.metrics if m.normalized is not None)
    return Part(quality, f"mean of {count} metric(s): {names}")


def quality_sql(req: Requirement) -> SqlPart:
    if req.metric_floors:
        # The selection reads the first floor's metric as c.value and joins the others as f1,
        # f2... (see catalog.filters.sql_filters).
        names = ["c.value"] + [f"f{i}.value" for i in range(1, len(req.metric_floors))]
        parts = " + ".join(names)
        return SqlPart(f"(({parts}) / {float(len(req.metric_floors))})")
    return SqlPart("coalesce(c.quality, 0.0)")


# -- popularity and recency -----------------------------------------------------------------------


def popularity_part(card: ModelCard, _req: Requirement) -> Part:
    return Part(popularity_score(card.popularity), f"{card.popularity:,} downloads")


def popularity_sql(_req: Requirement) -> SqlPart:
    return SqlPart("c.popularity_score")


def recency_part(card: ModelCard, _req: Requirement, *, now_days: float) -> Part:
    days = epoch_days(card.updated_at or card.created_at)
    if days is None:
        return Part(0.0, "no date")
    age = now_days - days
    return Part(clamp(1.0 - age / RECENCY_HORIZON_DAYS), f"updated {max(age, 0):.0f} days ago")


def recency_sql(_req: Requirement, *, now_days: float) -> SqlPart:
    return SqlPart(
        "(CASE WHEN c.updated_days IS NULL THEN 0.0 ELSE "
        f"max(0.0, min(1.0, 1.0 - (? - c.updated_days) / {RECENCY_HORIZON_DAYS})) END)",
        (now_days,),
    )


CRITERIA: dict[str, tuple[Callable[..., Part], Callable[..., SqlPart]]] = {
    "quality": (quality_part, quality_sql),
    "size": (size_part, size_sql),
    "popularity": (popularity_part, popularity_sql),
    "recency": (recency_part, recency_sql),
}


def weighted(parts: list[tuple[str, float, Part]]) -> tuple[float, tuple[Criterion, ...]]:
    """Total and breakdown of (name, weight, part) triples: sum(w * v) / sum(w)."""
    weight_sum = sum(w for _n, w, _p in parts) or 1.0
    total = 0.0
    for _name, weight, part in parts:
        total += weight * part.value
    breakdown = tuple(Criterion(n, p.value, w, p.detail) for n, w, p in parts)
    return total / weight_sum, breakdown


def weighted_sql(parts: list[tuple[float, SqlPart]]) -> SqlPart:
    weight_sum = sum(w for w, _p in parts) or 1.0
    expression = " + ".join(f"{float(w)} * {p.expression}" for w, p in parts)
    params = tuple(x for _w, p in parts for x in p.params)
    return SqlPart(f"(({expression}) / {float(weight_sum)})", params)
