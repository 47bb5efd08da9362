"""SQL and Python must agree: the catalog's filters with ``violations()``, text search with
``query_matches()``, and each built-in policy's ``rank_sql`` with its ``score()``, on cards with
missing fields, unknown dtypes, lower-is-better metrics and non-ASCII text."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstore.catalog import Catalog
from gptstore.catalog.filters import sql_filters, violations
from gptstore.manager import build, make_plugin_manager
from gptstore.records import ScoringPolicy
from gptstore.types import MeasuredBound, Metric, MetricFloor, ModelCard, Requirement

TEXT = st.text(alphabet="abcdeéèçñ ﬁ²_-XYZ0189", min_size=0, max_size=24)
TASKS = ("text-generation", "fill-mask", "summarization")
LICENSES = ("mit", "apache-2.0", "llama3")
LANGUAGES = ("en", "fr", "de")
METRICS = ("mmlu", "arc", "wikitext")  # wikitext is reported as perplexity: lower is better
MEASURED = ("perplexity@onnx", "perplexity@torch", "decode_tokens_per_s@onnx")

metrics = st.lists(
    st.builds(
        Metric,
        name=st.sampled_from(METRICS),
        value=st.floats(0, 120, allow_nan=False),
        kind=st.sampled_from(("acc", "perplexity", None)),
    )
    | st.builds(
        Metric,
        name=st.sampled_from(MEASURED),
        value=st.floats(0, 120, allow_nan=False),
        origin=st.just("measured"),
    ),
    max_size=4,
    unique_by=lambda m: m.name,
)
cards = st.lists(
    st.builds(
        ModelCard,
        source=st.just("s"),
        model_id=st.from_regex(r"[a-z]{1,6}/[a-z0-9]{1,6}", fullmatch=True),
        name=TEXT,
        description=TEXT,
        tags=st.lists(TEXT, max_size=2),
        parameters=st.none() | st.integers(1, 10**11),
        dtype=st.none() | st.sampled_from(("float32", "bfloat16", "int8", "q4_k")),
        context_length=st.none() | st.sampled_from((512, 4096, 32768)),
        license=st.none() | st.sampled_from(LICENSES),
        tasks=st.lists(st.sampled_from(TASKS), max_size=2, unique=True),
        languages=st.lists(st.sampled_from(LANGUAGES), max_size=2, unique=True),
        metrics=metrics,
        popularity=st.integers(0, 10**8),
        updated_at=st.none()
        | st.datetimes(datetime(2015, 1, 1), datetime(2027, 1, 1), timezones=st.just(UTC)),
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda c: c.model_id,
)
requirements = st.builds(
    Requirement,
    task=st.none() | st.sampled_from(TASKS),
    min_params=st.none() | st.integers(1, 10**9),
    max_params=st.none() | st.integers(10**9, 10**11),
    licenses=st.lists(st.sampled_from(LICENSES), max_size=2),
    languages=st.lists(st.sampled_from(LANGUAGES), max_size=2),
    min_context=st.none() | st.sampled_from((1024, 32768)),
    memory_budget=st.none() | st.integers(10**8, 10**11),
    dtype=st.none() | st.sampled_from(("float16", "int8")),
    metric_floors=st.lists(
        st.builds(MetricFloor, st.sampled_from(METRICS), st.floats(0, 1)),
        max_size=2,
        unique_by=lambda f: f.name,
    ),
    measured=st.lists(
        st.builds(
            MeasuredBound,
            name=st.sampled_from(MEASURED),
            at_most=st.floats(60, 120),
            at_least=st.none() | st.floats(0, 60),
        )
        | st.builds(MeasuredBound, name=st.sampled_from(MEASURED), at_least=st.floats(0, 120)),
        max_size=2,
        unique_by=lambda b: b.name,
    ),
    query=st.none() | st.sampled_from(("fi", "2", "e", "ç", "abc xyz", "ñ")),
    include_delisted=st.booleans(),
)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def filled(batch: list[ModelCard], directory: str) -> Catalog:
    catalog = Catalog(Path(directory) / "catalog.db")
    catalog.upsert(batch, source="s")
    catalog.upsert(batch[: len(batch) // 2 + 1], source="s")  # the rest are delisted
    return catalog


@SETTINGS
@given(batch=cards, requirement=requirements)
def test_filters_and_search_agree_with_python(batch, requirement):
    with tempfile.TemporaryDirectory() as directory:
        catalog = filled(batch, directory)
        entries = catalog.entries([row[0] for row in catalog.execute("SELECT id FROM cards")])
        expected = {e.id for e in entries if not violations(e.card, requirement, listed=e.listed)}
        for fast in (True, False):
            table, clauses, params = sql_filters(requirement, catalog.bits(), fast=fast)
            where = " AND ".join(clauses) or "1"
            found = [
                row[0] for row in catalog.execute(f"SELECT c.id FROM {table} WHERE {where}", params)
            ]
            assert sorted(found) == sorted(expected)
        results, total = catalog.search(requirement, limit=100)
        assert {e.id for e in results} == expected
        assert total == len(expected)
        catalog.close()


@pytest.fixture(scope="module")
def policies():
    manager = make_plugin_manager(entrypoints=False)
    return {
        name: manager.get(ScoringPolicy, name) for name in ("balanced", "smallest", "best-quality")
    }


@SETTINGS
@given(batch=cards, requirement=requirements)
def test_rank_sql_computes_the_python_score(policies, batch, requirement):
    with tempfile.TemporaryDirectory() as directory:
        catalog = filled(batch, directory)
        table, clauses, params = sql_filters(requirement, catalog.bits())
        where = " AND ".join(clauses) or "1"
        for record in policies.values():
            scorer = build(record, {})
            ranking = scorer.rank_sql(requirement)
            rows = catalog.execute(
                f"SELECT c.id, {ranking.expression} FROM {table} WHERE {where}",
                [*ranking.params, *params],
            )
            by_id = {entry.id: entry.card for entry in catalog.entries([r[0] for r in rows])}
            for card_id, value in rows:
                assert value == pytest.approx(
                    scorer.score(by_id[card_id], requirement).total, abs=1e-12
                ), (record.name, by_id[card_id])
        catalog.close()
