"""Hard constraints of a Requirement, each in two forms that agree: an SQL clause over the
catalog (to filter a million cards) and a Python check on one card (to explain an exclusion).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from gptstore.errors import InvalidInput
from gptstore.scoring import UNKNOWN_DTYPE_BYTES
from gptstore.types import ModelCard, Requirement
from gptstore.units import DTYPE_BYTES, format_bytes, format_count


def fts_text(text: str) -> str:
    """Text as stored in the FTS index: NFKC, so ligatures and superscripts ("ﬁ", "²") become
    the letters and digits that queries are made of."""
    return unicodedata.normalize("NFKC", text)


def words(text: str) -> list[str]:
    """Tokens as SQLite's unicode61 tokenizer (remove_diacritics 2) sees ``fts_text(text)``."""
    folded = unicodedata.normalize("NFKD", fts_text(text).lower())
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch))
    return re.findall(r"[^\W_]+", folded)


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression: every word must appear, as a word or a word's prefix.

    Words are quoted so user text can never be read as FTS5 syntax.
    """
    terms = words(text)
    if not terms:
        raise InvalidInput("query", [f"{text!r} has no words to search for"])
    return " ".join(f'"{term}"*' for term in terms)


def query_matches(card: ModelCard, text: str) -> bool:
    haystack = set(words(" ".join((card.name, card.description, *card.tags))))
    return all(any(word.startswith(term) for word in haystack) for term in words(text))


#: (kind, value) -> bit, as the catalog's vocabulary table assigns them.
Bits = Mapping[tuple[str, str], int]


def sql_filters(
    req: Requirement, bits: Bits | None = None, *, fast: bool = True
) -> tuple[str, list[str], list[Any]]:
    """What to select from, WHERE clauses (to be ANDed) and the parameters of both, in order.

    With ``fast`` (the default) the requirement picks the selection table whose index leads with
    its most selective constraint: ``card_metrics c`` for a metric floor (``c.value`` is the first
    floor's value, further floors join ``card_metrics f1``, ``f2``...), else ``card_tasks c`` for
    a task, else ``cards c``. ``fast=False`` always reads ``cards c`` with subqueries only, so
    that ``NOT (clauses)`` selects exactly the cards that fail. Every table has the columns in
    :data:`~gptstore.catalog.schema.RANK_COLUMNS`. ``bits`` lets task and language filters
    test bits inside an index; values without a bit fall back to card_tasks / card_languages.
    """
    bits = bits or {}
    table = "cards c"
    clauses: list[str] = []
    params: list[Any] = []
    floors = req.metric_floors if fast else ()
    if floors:
        table = "card_metrics c"
        for index, floor in enumerate(floors[1:], start=1):
            table += (
                f" JOIN card_metrics f{index} ON f{index}.id = c.id "
                f"AND f{index}.name = ? AND f{index}.value >= ?"
            )
            params.extend((floor.name, floor.minimum))  # join parameters come first
        clauses.append("c.name = ? AND c.value >= ?")
        params.extend((floors[0].name, floors[0].minimum))
    if req.task and fast and not floors:
        table = "card_tasks c"
        clauses.append("c.task = ?")
        params.append(req.task)
    elif req.task and ("task", req.task) in bits:
        clauses.append("(c.task_bits & ?) != 0")
        params.append(1 << bits["task", req.task])
    elif req.task:
        # Correlated EXISTS: one index lookup per card reached, and exact under NOT.
        clauses.append("EXISTS (SELECT 1 FROM card_tasks t WHERE t.id = c.id AND t.task = ?)")
        params.append(req.task)
    if not req.include_delisted:
        clauses.append("c.listed = 1")
    if req.sources:
        clauses.append(f"c.source IN ({', '.join('?' * len(req.sources))})")
        params.extend(req.sources)
    if req.min_params is not None:
        clauses.append("c.parameters >= ?")
        params.append(req.min_params)
    if req.max_params is not None:
        clauses.append("c.parameters <= ?")
        params.append(req.max_params)
    if req.licenses:
        clauses.append(f"c.license IN ({', '.join('?' * len(req.licenses))})")
        params.extend(req.licenses)
    mask = sum(1 << bits["language", lang] for lang in req.languages if ("language", lang) in bits)
    if mask:
        clauses.append("(c.language_bits & ?) = ?")
        params.extend((mask, mask))
    for language in req.languages:
        if ("language", language) not in bits:
            clauses.append(
                "EXISTS (SELECT 1 FROM card_languages l WHERE l.language = ? AND l.card_id = c.id)"
            )
            params.append(language)
    if req.min_context is not None:
        clauses.append("c.context_length >= ?")
        params.append(req.min_context)
    if req.memory_budget is not None:
        if req.dtype:
            # The product is the constraint; the bound before it (a hair looser) lets SQLite
            # seek the size index instead of computing the product for every card.
            bound = req.memory_budget / DTYPE_BYTES[req.dtype] * (1 + 1e-9)
            clauses.append("c.parameters <= ? AND c.parameters * ? <= ?")
            params.extend((bound, DTYPE_BYTES[req.dtype], req.memory_budget))
        else:
            clauses.append(f"c.parameters * coalesce(c.dtype_bytes, {UNKNOWN_DTYPE_BYTES}) <= ?")
            params.append(req.memory_budget)
    for floor in req.metric_floors if not floors else ():
        clauses.append(
            "EXISTS (SELECT 1 FROM card_metrics m WHERE m.name = ? AND m.id = c.id "
            "AND m.value >= ?)"
        )
        params.extend((floor.name, floor.minimum))
    for measured in req.measured:
        tests = ["m.name = ?", "m.id = c.id"]
        params.append(measured.name)
        if measured.at_most is not None:
            tests.append("m.value <= ?")
            params.append(measured.at_most)
        if measured.at_least is not None:
            tests.append("m.value >= ?")
            params.append(measured.at_least)
        clauses.append(f"EXISTS (SELECT 1 FROM card_measured m WHERE {' AND '.join(tests)})")
    if req.query:
        clauses.append("c.id IN (SELECT rowid FROM cards_fts WHERE cards_fts MATCH ?)")
        params.append(fts_query(req.query))
    return table, clauses, params


def violations(card: ModelCard, req: Requirement, *, listed: bool = True) -> list[str]:
    """Every hard constraint ``card`` fails, as a readable line; empty when it passes all."""
    failed: list[str] = []
    p = card.parameters
    if not listed and not req.include_delisted:
        failed.append(f"no longer listed by source {card.source}")
    if req.sources and card.source not in req.sources:
        failed.append(f"source {card.source} not in {', '.join(req.sources)}")
    if req.task and req.task not in card.tasks:
        failed.append(f"task {req.task} not among {', '.join(card.tasks) or 'no tasks'}")
    if req.min_params is not None and (p is None or p < req.min_params):
        failed.append(f"{format_count(p)} parameters < min {format_count(req.min_params)}")
    if req.max_params is not None and (p is None or p > req.max_params):
        failed.append(f"{format_count(p)} parameters > max {format_count(req.max_params)}")
    if req.licenses and card.license not in req.licenses:
        failed.append(f"license {card.license or 'unknown'} not in {', '.join(req.licenses)}")
    missing = [lang for lang in req.languages if lang not in card.languages]
    if missing:
        failed.append(
            f"language(s) {', '.join(missing)} not among "
            f"{', '.join(card.languages) or 'none listed'}"
        )
    if req.min_context is not None and (
        card.context_length is None or card.context_length < req.min_context
    ):
        failed.append(f"context {card.context_length or 'unknown'} < min {req.min_context}")
    if req.memory_budget is not None:
        per_weight = (
            DTYPE_BYTES[req.dtype] if req.dtype else (card.dtype_bytes or UNKNOWN_DTYPE_BYTES)
        )
        if p is None or p * per_weight > req.memory_budget:
            at = req.dtype or card.dtype or "float32"
            need = format_bytes(p * per_weight) if p is not None else "unknown size"
            failed.append(f"weights {need} at {at} > budget {format_bytes(req.memory_budget)}")
    for floor in req.metric_floors:
        metric = card.metric(floor.name)
        value = metric.normalized if metric else None
        if value is None or value < floor.minimum:
            shown = "missing" if value is None else f"{value:.3g}"
            failed.append(f"{floor.name} {shown} < floor {floor.minimum:g}")
    for bound in req.measured:
        measured = next(
            (m for m in card.metrics if m.name == bound.name and m.origin == "measured"), None
        )
        if measured is None:
            failed.append(f"{bound.name} not measured (gptstore eval ARTIFACT --backend BACKEND)")
        elif not bound.holds(measured.value):
            failed.append(f"{bound.name} {measured.value:.4g} measured, not {bound.describe()}")
    if req.query and not query_matches(card, req.query):
        failed.append(f"does not match query {req.query!r}")
    return failed
