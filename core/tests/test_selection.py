"""Selection: hard filters, policy scores, ranking and explanations."""

from __future__ import annotations

import pytest
from attrs import frozen

from gptstore import hookimpl
from gptstore.catalog import Catalog
from gptstore.config import Config
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.manager import build
from gptstore.protocols import SqlRankable
from gptstore.records import ScoringPolicy
from gptstore.selection import make_scorer, select_models
from gptstore.testing.synthetic import synthetic_cards
from gptstore.types import Metric, MetricFloor, ModelCard, Requirement

M = 10**6


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    catalog = Catalog(tmp_path_factory.mktemp("sel") / "catalog.db")
    catalog.upsert(list(synthetic_cards(3000, seed=3, source="s")), source="s")
    return catalog


REQUIREMENTS = [
    Requirement(),
    Requirement(task="text-generation", max_params=2000 * M),
    Requirement(memory_budget=4 * 10**9, licenses=("apache-2.0", "mit")),
    Requirement(memory_budget=2 * 10**9, dtype="int8", languages=("en",)),
    Requirement(metric_floors=(MetricFloor("mmlu", 0.4),), max_params=10**10),
    Requirement(query="chat", min_context=4096),
]


class PythonOnly:
    """Wraps a scorer and hides its rank_sql, forcing the Python path."""

    def __init__(self, scorer):
        self.scorer = scorer

    def score(self, card, requirement):
        return self.scorer.score(card, requirement)


@pytest.mark.parametrize("policy", ["balanced", "smallest", "best-quality"])
@pytest.mark.parametrize("requirement", REQUIREMENTS)
def test_sql_ranking_agrees_with_python_scores(synthetic, plugin_manager, policy, requirement):
    scorer = build(plugin_manager.get(ScoringPolicy, policy), {})
    assert isinstance(scorer, SqlRankable)
    in_sql = select_models(
        synthetic, scorer, requirement, policy=policy, limit=15, explain_excluded=0
    )
    in_python = select_models(
        synthetic, PythonOnly(scorer), requirement, policy=policy, limit=15, explain_excluded=0
    )
    assert (in_sql.ranked_in, in_python.ranked_in) == ("sql", "python")
    assert in_sql.matched == in_python.matched > 0
    assert [c.card.uid for c in in_sql.ranked] == [c.card.uid for c in in_python.ranked]


def card(model_id, **fields):
    return ModelCard(source="local", model_id=model_id, tasks=("text-generation",), **fields)


@pytest.fixture
def small(tmp_path):
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.upsert(
        [
            card(
                "tiny", parameters=5 * M, license="mit", metrics=(Metric(name="mmlu", value=25.0),)
            ),
            card(
                "mid",
                parameters=120 * M,
                license="apache-2.0",
                metrics=(Metric(name="mmlu", value=0.45),),
            ),
            card(
                "big",
                parameters=1500 * M,
                license="apache-2.0",
                metrics=(Metric(name="mmlu", value=0.60),),
            ),
            card("closed", parameters=50 * M, license="proprietary"),
            ModelCard(source="local", model_id="encoder", parameters=30 * M, tasks=("fill-mask",)),
        ],
        source="local",
    )
    return catalog


def test_policies_rank_differently_and_explain(small, plugin_manager):
    requirement = Requirement(
        task="text-generation", max_params=200 * M, licenses=("mit", "apache-2.0")
    )

    def ranked(policy):
        scorer = build(plugin_manager.get(ScoringPolicy, policy), {})
        return select_models(small, scorer, requirement, policy=policy)

    smallest = ranked("smallest")
    assert [c.card.model_id for c in smallest.ranked] == ["tiny", "mid"]
    best = ranked("best-quality")
    assert [c.card.model_id for c in best.ranked] == ["mid", "tiny"]
    assert best.ranked[0].score.breakdown[0].detail.startswith("mean of 1 metric(s): mmlu")
    balanced = ranked("balanced")
    assert {c.name for c in balanced.ranked[0].score.breakdown} == {
        "quality",
        "size",
        "popularity",
        "recency",
    }
    size = next(c for c in balanced.ranked[1].score.breakdown if c.name == "size")
    assert "120.0M of 200.0M parameters" in size.detail
    assert (balanced.matched, balanced.total) == (2, 5)
    reasons = {c.card.model_id: c.failures for c in balanced.excluded}
    assert reasons == {
        "big": ("1.5B parameters > max 200.0M",),
        "closed": ("license proprietary not in mit, apache-2.0",),
        "encoder": (
            "task text-generation not among fill-mask",
            "license unknown not in mit, apache-2.0",
        ),
    }


def test_balanced_weights_change_the_ranking(small, plugin_manager):
    record = plugin_manager.get(ScoringPolicy, "balanced")
    requirement = Requirement(task="text-generation", max_params=200 * M)
    quality_only = build(
        record, {"weights": {"quality": 1, "size": 0, "popularity": 0, "recency": 0}}
    )
    size_only = build(record, {"weights": {"quality": 0, "size": 1, "popularity": 0, "recency": 0}})
    assert (
        select_models(small, quality_only, requirement, policy="b").ranked[0].card.model_id == "mid"
    )
    assert (
        select_models(small, size_only, requirement, policy="b").ranked[0].card.model_id == "tiny"
    )
    with pytest.raises(Exception, match=r"unknown weight\(s\) speed"):
        build(record, {"weights": {"speed": 1}})


def test_memory_budget_uses_the_dtype(small, plugin_manager):
    scorer = build(plugin_manager.get(ScoringPolicy, "smallest"), {})
    at_fp32 = select_models(small, scorer, Requirement(memory_budget=10**9), policy="smallest")
    at_int8 = select_models(
        small, scorer, Requirement(memory_budget=10**9, dtype="int8"), policy="smallest"
    )
    # unknown dtypes count as float32: 120M * 4 bytes fits 1 GB, 1.5B does not, even at int8
    assert {c.card.model_id for c in at_fp32.ranked} == {"tiny", "mid", "closed", "encoder"}
    assert {c.card.model_id for c in at_int8.ranked} == {"tiny", "mid", "closed", "encoder"}
    big = next(c for c in at_int8.excluded if c.card.model_id == "big")
    assert big.failures == ("weights 1.5 GB at int8 > budget 1.0 GB",)


def test_make_scorer_puts_the_callers_options_over_config_weight_by_weight(plugin_manager):
    config = Config(policies={"balanced": {"weights": {"size": 1.0, "quality": 0.0}}})
    name, scorer = make_scorer(plugin_manager, config, "Balanced")
    assert name == "balanced"
    assert scorer.weights == {"quality": 0.0, "size": 1.0, "popularity": 0.15, "recency": 0.15}
    _name, scorer = make_scorer(
        plugin_manager, config, "balanced", {"weights": {"quality": 0.5}}, weights={"recency": 0}
    )
    assert scorer.weights == {"quality": 0.5, "size": 1.0, "popularity": 0.15, "recency": 0.0}


@pytest.mark.parametrize(
    ("configured", "options", "weights", "where", "message"),
    [
        (
            {"weights": {"speed": 1}},
            None,
            None,
            "$.options",
            "unknown weight(s) speed; criteria are quality, size, popularity, recency "
            "@ $.policies.balanced",
        ),
        (
            {"weights": {"size": 1}},
            {"weights": {"quality": "high"}},
            None,
            "$.options",
            "expected float, got str @ $.options.weights['quality']",
        ),
        ({"weights": {"size": 1}}, {"speed": 1}, None, "$.options", "(speed) @ $.options"),
        (
            {"weights": {"size": 1}},
            None,
            {"quality": -1.0},
            "--weight",
            "weight(s) of quality must lie in 0..1000 @ --weight",
        ),
        (
            {"weights": {"quality": -1}},
            None,
            {"size": 1.0},
            "--weight",
            "weight(s) of quality must lie in 0..1000 @ $.policies.balanced",
        ),
    ],
    ids=["config", "request-type", "request-extra", "flag", "config-under-flag"],
)
def test_make_scorer_names_the_place_of_a_mistake(
    plugin_manager, configured, options, weights, where, message
):
    config = Config(policies={"balanced": configured})
    with pytest.raises(GptstoreError) as excinfo:
        make_scorer(plugin_manager, config, "balanced", options, weights=weights, where=where)
    assert str(excinfo.value).endswith(message)


@frozen
class StrictOptions:
    threshold: float = 0.5


class ThresholdPolicy:
    """A plugin's policy whose options have no weights."""

    @hookimpl
    def gptstore_scoring_policies(self):
        yield ScoringPolicy(
            name="threshold", factory=lambda options: options, options_type=StrictOptions
        )


@pytest.mark.parametrize("policy", ["smallest", "threshold"])
def test_weights_for_a_policy_that_takes_none_name_the_flag(plugin_manager, policy):
    plugin_manager.register_plugin(ThresholdPolicy(), "threshold")
    with pytest.raises(InvalidInput) as excinfo:
        make_scorer(plugin_manager, Config(), policy, weights={"quality": 0.5}, where="--weight")
    assert str(excinfo.value) == f"invalid --weight: policy {policy!r} takes no weights"
