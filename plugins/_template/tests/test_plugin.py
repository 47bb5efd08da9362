"""Tests of the template plugin against a real catalog, through the same path the CLI uses."""

from __future__ import annotations

import gptstore_template.plugin
from gptstore.catalog import Catalog
from gptstore.manager import build
from gptstore.records import ScoringPolicy
from gptstore.selection import select_models
from gptstore.types import Metric, ModelCard, Requirement


def test_permissive_license_ranks_first(plugin_manager, store_home):
    plugin_manager.register_plugin(gptstore_template.plugin, "template")
    try:
        record = plugin_manager.get(ScoringPolicy, "permissive-first")
        catalog = Catalog(store_home.catalog_path)
        catalog.upsert(
            [
                ModelCard(
                    source="local",
                    model_id="strong-but-restricted",
                    license="llama3",
                    parameters=10**8,
                    metrics=(Metric(name="mmlu", value=0.9),),
                ),
                ModelCard(
                    source="local",
                    model_id="weak-but-free",
                    license="mit",
                    parameters=10**8,
                    metrics=(Metric(name="mmlu", value=0.3),),
                ),
            ],
            source="local",
        )
        scorer = build(record, {"licenses": ["mit"]})
        selection = select_models(catalog, scorer, Requirement(), policy=record.name)
        assert [c.card.model_id for c in selection.ranked] == [
            "weak-but-free",
            "strong-but-restricted",
        ]
        assert selection.ranked_in == "python"
        assert "mit is permissive" in selection.ranked[0].score.breakdown[0].detail
    finally:
        plugin_manager.unregister_plugin("template")
