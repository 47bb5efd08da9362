"""The SQLite catalog: schema, sync, consistency under concurrent reads, search and filters."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from attrs import evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptstore.catalog import Catalog
from gptstore.catalog.filters import sql_filters, violations
from gptstore.catalog.schema import SCHEMA_VERSION
from gptstore.errors import CatalogError, InvalidInput
from gptstore.testing.synthetic import LANGUAGES, LICENSES, METRICS, TASKS, synthetic_cards
from gptstore.types import MeasuredBound, Metric, MetricFloor, ModelCard, Requirement


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(tmp_path / "catalog.db")
    yield catalog
    catalog.close()


def test_new_catalog_is_wal_at_current_schema(catalog):
    assert catalog.schema_version() == SCHEMA_VERSION
    assert catalog.connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Catalog(catalog.path)  # migrating twice is a no-op
    assert again.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "catalog.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(CatalogError, match="newer than this gptstore knows"):
        Catalog(path)


def test_measured_figures_of_an_older_catalog_are_filtered_after_migration(tmp_path):
    """Schema 1 kept measured figures only in the card documents; migrating to 2 indexes them
    so that perplexity ceilings and speed floors filter in SQL."""
    path = tmp_path / "catalog.db"
    card = ModelCard(
        source="store",
        model_id="tiny-onnx",
        metrics=(Metric(name="perplexity@onnx", value=12.5, kind="perplexity", origin="measured"),),
    )
    old = Catalog(path)
    old.upsert([card, ModelCard(source="store", model_id="tiny")], source="store")
    with old.write() as conn:
        conn.execute("DROP TABLE card_measured")
        conn.execute("PRAGMA user_version = 1")
    old.close()
    catalog = Catalog(path)
    assert catalog.schema_version() == SCHEMA_VERSION
    ceiling = Requirement(measured=[MeasuredBound(name="perplexity@onnx", at_most=20)])
    entries, _total = catalog.search(ceiling)
    assert [e.card.model_id for e in entries] == ["tiny-onnx"]
    tight = Requirement(measured=[MeasuredBound(name="Perplexity@ONNX", at_most=10)])
    assert catalog.search(tight)[1] == 0
    assert violations(card, tight) == ["perplexity@onnx 12.5 measured, not <= 10"]
    catalog.close()


@pytest.mark.parametrize(
    ("bound", "message"),
    [
        ({"name": "perplexity", "at_most": 2}, "must be named FIGURE@BACKEND"),
        ({"name": "perplexity@onnx"}, "has no bound"),
        ({"name": "perplexity@onnx", "at_most": 2, "at_least": 3}, "at_least 3 > at_most 2"),
        ({"name": "perplexity@onnx", "at_most": float("nan")}, "must lie in"),
    ],
)
def test_bad_measured_bounds_are_clear_errors(bound, message):
    from gptstore.converter import structure

    with pytest.raises(InvalidInput, match=message):
        structure({"measured": [bound]}, Requirement, what="requirement")


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match="move the file away and run `gptstore sync`"):
        Catalog(path)


def test_upsert_adds_updates_and_delists(catalog):
    a, b, c = (ModelCard(source="s", model_id=name, parameters=10**6) for name in "abc")
    first = catalog.upsert([a, b], source="s")
    assert (first.added, first.updated, first.unchanged, first.delisted) == (2, 0, 0, 0)
    second = catalog.upsert([evolve(a, parameters=2 * 10**6), c], source="s")
    assert (second.added, second.updated, second.unchanged, second.delisted) == (1, 1, 0, 1)
    assert catalog.resolve("s:a").card.parameters == 2 * 10**6
    assert not catalog.resolve("b").listed
    assert catalog.count() == 3
    assert catalog.count(listed_only=True) == 2
    third = catalog.upsert([a, b, c], source="s")  # b comes back
    assert (third.updated, third.unchanged) == (2, 1)
    assert catalog.resolve("b").listed


def test_a_failed_write_leaves_the_catalog_as_it_was(catalog):
    catalog.upsert([ModelCard(source="s", model_id="a")], source="s")
    with pytest.raises(CatalogError, match="must set source='s'"):
        catalog.upsert(
            [ModelCard(source="s", model_id="b"), ModelCard(source="other", model_id="c")],
            source="s",
        )
    assert [e.card.model_id for e in catalog.search(Requirement())[0]] == ["a"]


def test_resolve_explains_ambiguity_and_absence(catalog):
    catalog.upsert([ModelCard(source="x", model_id="m")], source="x")
    catalog.upsert([ModelCard(source="y", model_id="m")], source="y")
    with pytest.raises(Exception, match="'m' is ambiguous: x:m, y:m"):
        catalog.resolve("m")
    with pytest.raises(Exception, match="did you mean x:m"):
        catalog.resolve("x:")


def test_readers_see_all_or_nothing_of_a_sync(tmp_path):
    path = tmp_path / "catalog.db"
    writer = Catalog(path)
    writer.upsert(list(synthetic_cards(500, seed=1, source="s")), source="s")
    replacement = list(synthetic_cards(3000, seed=2, source="s"))
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        reader = Catalog(path)
        while not stop.is_set():
            with reader.read() as conn:
                listed = conn.execute("SELECT count(*) FROM cards WHERE listed = 1").fetchone()[0]
                docs = conn.execute("SELECT count(*) FROM card_docs").fetchone()[0]
            seen.add(listed)
            assert docs >= listed
        reader.close()

    thread = threading.Thread(target=read)
    thread.start()
    try:
        writer.upsert(replacement, source="s")
    finally:
        stop.set()
        thread.join()
    assert seen <= {500, 3000}
    assert writer.count(listed_only=True) == 3000


def test_opening_and_reading_do_not_wait_for_a_writer(tmp_path):
    path = tmp_path / "catalog.db"
    writer = Catalog(path)
    writer.upsert([ModelCard(source="s", model_id="a")], source="s")
    with writer.write() as conn:
        conn.execute("UPDATE cards SET listed = 0")
        reader = Catalog(path)  # would block for the busy timeout if opening took a write lock
        reader.connection.execute("PRAGMA busy_timeout = 0")
        assert reader.count(listed_only=True) == 1  # the committed state, not the pending one
        reader.close()
    assert writer.count(listed_only=True) == 0


def test_text_search_ranks_and_combines_with_filters(catalog):
    catalog.upsert(
        [
            ModelCard(
                source="s",
                model_id="coder-7b",
                description="Writes Python code",
                tags=("code",),
                parameters=7 * 10**9,
                tasks=("text-generation",),
            ),
            ModelCard(
                source="s",
                model_id="coder-1b",
                description="Small code model",
                tags=("code", "tiny"),
                parameters=10**9,
                tasks=("text-generation",),
            ),
            ModelCard(
                source="s",
                model_id="chat-1b",
                description="A café chat model",
                parameters=10**9,
                tasks=("text-generation",),
            ),
        ],
        source="s",
    )
    entries, total = catalog.search(Requirement(query="code", max_params=2 * 10**9))
    assert [e.card.model_id for e in entries] == ["coder-1b"]
    assert total == 1
    entries, _ = catalog.search(Requirement(query="cafe"))  # diacritics folded
    assert [e.card.model_id for e in entries] == ["chat-1b"]
    entries, _ = catalog.search(Requirement(query='code")*(:'))  # never parsed as FTS syntax
    assert {e.card.model_id for e in entries} == {"coder-1b", "coder-7b"}
    with pytest.raises(InvalidInput, match="has no words"):
        catalog.search(Requirement(query="!!!"))


requirements = st.builds(
    Requirement,
    task=st.none() | st.sampled_from(TASKS),
    min_params=st.none() | st.integers(10**6, 10**9),
    max_params=st.none() | st.integers(10**9, 10**11),
    licenses=st.lists(st.sampled_from(LICENSES), max_size=3),
    languages=st.lists(st.sampled_from(LANGUAGES), max_size=2),
    min_context=st.none() | st.sampled_from((1024, 4096, 32768)),
    memory_budget=st.none() | st.integers(10**8, 10**11),
    dtype=st.none() | st.sampled_from(("float16", "int8", "float32")),
    metric_floors=st.lists(
        st.builds(MetricFloor, st.sampled_from(METRICS), st.floats(0.1, 0.9)),
        max_size=2,
        unique_by=lambda f: f.name,
    ),
    query=st.none() | st.sampled_from(("chat", "code ins", "medical", "org1")),
    include_delisted=st.booleans(),
)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    catalog = Catalog(tmp_path_factory.mktemp("filled") / "catalog.db")
    cards = list(synthetic_cards(400, seed=7, source="s"))
    catalog.upsert(cards, source="s")
    catalog.upsert(cards[:300], source="s")  # the last 100 are delisted
    return catalog


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requirement=requirements)
def test_sql_filters_agree_with_python_checks(filled, requirement):
    entries = filled.entries([row[0] for row in filled.execute("SELECT id FROM cards")])
    in_python = {e.id for e in entries if not violations(e.card, requirement, listed=e.listed)}
    for fast in (True, False):
        table, clauses, params = sql_filters(requirement, filled.bits(), fast=fast)
        where = " AND ".join(clauses) or "1"
        rows = filled.execute(f"SELECT c.id FROM {table} WHERE {where}", params)
        assert len(rows) == len({row[0] for row in rows})
        assert {row[0] for row in rows} == in_python
    found, total = filled.search(requirement, limit=len(entries))
    assert {e.id for e in found} == in_python
    assert total == len(in_python)
    # the complement, as selection queries it to explain exclusions
    _table, clauses, params = sql_filters(requirement, filled.bits(), fast=False)
    failing = filled.execute(
        f"SELECT c.id FROM cards c WHERE NOT coalesce(({' AND '.join(clauses) or '1'}), 0)", params
    )
    assert {row[0] for row in failing} == {e.id for e in entries} - in_python


def test_every_selection_table_has_the_documented_columns(catalog):
    from gptstore.catalog.schema import RANK_COLUMNS

    for table in ("cards", "card_tasks", "card_metrics"):
        columns = {row[1] for row in catalog.execute(f"PRAGMA table_info({table})")}
        assert set(RANK_COLUMNS) <= columns, table


def test_a_requirement_holds_a_bounded_number_of_floors_and_bounds():
    from gptstore.converter import structure

    many = [{"name": f"f{i}@onnx", "at_most": 1} for i in range(33)]
    with pytest.raises(InvalidInput, match="measured holds at most 32 entries, got 33"):
        structure({"measured": many}, Requirement, what="requirement")


@pytest.mark.parametrize(
    "requirement",
    [
        Requirement(),
        Requirement(task="text-generation"),
        Requirement(licenses=("apache-2.0", "mit"), max_params=10**9),
        Requirement(query="chat"),
        Requirement(query="chat", task="text-generation", languages=("en",)),
    ],
    ids=["all", "task", "filters", "words", "words-and-filters"],
)
def test_facet_counts_are_the_matching_cards_counted_by_value(catalog, requirement):
    cards = list(synthetic_cards(400, seed=5, source="s"))
    catalog.upsert(cards, source="s")
    catalog.upsert(list(synthetic_cards(50, seed=6, source="t")), source="t")
    entries, total = catalog.search(requirement, limit=10_000)
    facets = catalog.facets(requirement, most=1000)
    matched = [e.card for e in entries]
    assert len(matched) == total
    for name, values in (
        ("source", lambda c: [c.source]),
        ("license", lambda c: [c.license or "?"]),
        ("task", lambda c: list(c.tasks)),
    ):
        expected: dict[str, int] = {}
        for card in matched:
            for value in values(card):
                expected[value] = expected.get(value, 0) + 1
        assert dict(facets[name]) == expected, name
        counts = [count for _value, count in facets[name]]
        assert counts == sorted(counts, reverse=True)  # the commonest first
