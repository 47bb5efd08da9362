"""Every hookspec's docstring example is a complete plugin: run each one for real."""

from __future__ import annotations

import inspect
import json
import textwrap
import types
from pathlib import Path

import pytest

from gptstore import hookspecs
from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.manager import build
from gptstore.protocols import Backend, Optimizer, Refusal, Runner, Scorer, Source
from gptstore.records import ModelSource, OptimizationStrategy, ScoringPolicy, ServingBackend
from gptstore.types import (
    Artifact,
    ChatMessage,
    GenerationRequest,
    Manifest,
    Metric,
    ModelCard,
    OptimizationContext,
    Requirement,
    RunnerInfo,
    SearchQuery,
)

HOOKS = [
    name
    for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("gptstore_")
]


def example_module(hook_name: str) -> types.ModuleType:
    doc = getattr(hookspecs, hook_name).__doc__
    assert "Example::" in doc, f"{hook_name} has no example"
    code = textwrap.dedent(doc.split("Example::", 1)[1])
    module = types.ModuleType(f"example_{hook_name}")
    exec(compile(code, f"<{hook_name} example>", "exec"), module.__dict__)
    return module


def test_there_are_four_hooks():
    assert sorted(HOOKS) == [
        "gptstore_model_sources",
        "gptstore_optimization_strategies",
        "gptstore_scoring_policies",
        "gptstore_serving_backends",
    ]


@pytest.mark.parametrize("hook_name", HOOKS)
def test_hookspec_docstring_says_what_it_returns(hook_name):
    doc = getattr(hookspecs, hook_name).__doc__
    assert ":returns:" in doc
    assert inspect.signature(getattr(hookspecs, hook_name)).parameters == {}


def test_model_source_example(plugin_manager, tmp_path):
    plugin_manager.register_plugin(example_module("gptstore_model_sources"), "shelf-example")
    record = plugin_manager.get(ModelSource, "shelf")
    shelf = tmp_path / "shelf"
    (shelf / "good").mkdir(parents=True)
    (shelf / "good" / "config.json").write_text("{}")
    (shelf / "good" / "model.safetensors").write_bytes(b"x")
    (shelf / "pickled").mkdir()
    source = build(record, {"root": str(shelf)})
    assert isinstance(source, Source)
    found = list(source.search(SearchQuery()))
    assert [c.model_id for c in found if isinstance(c, ModelCard)] == ["good"]
    assert [r.model_id for r in found if isinstance(r, Refusal)] == ["pickled"]
    fetched = source.fetch("good", None, tmp_path / "dest")
    assert sorted(p.name for p in fetched.iterdir()) == ["config.json", "model.safetensors"]
    assert source.status().online


def test_scoring_policy_example(plugin_manager):
    plugin_manager.register_plugin(example_module("gptstore_scoring_policies"), "policy-example")
    scorer = build(plugin_manager.get(ScoringPolicy, "prefer-permissive"), {})
    assert isinstance(scorer, Scorer)
    free = ModelCard(
        source="x", model_id="a", license="mit", metrics=(Metric(name="m", value=0.5),)
    )
    closed = ModelCard(source="x", model_id="b", license="other")
    assert scorer.score(free, Requirement()).total == pytest.approx(0.75)
    assert scorer.score(closed, Requirement()).total == 0.0


def test_optimization_strategy_example(plugin_manager, tmp_path):
    plugin_manager.register_plugin(example_module("gptstore_optimization_strategies"), "opt-ex")
    record = plugin_manager.get(OptimizationStrategy, "make-greedy")
    optimizer = build(record, {"max_new_tokens": 8})
    assert isinstance(optimizer, Optimizer)
    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    (staging / "config.json").write_text("{}")
    parent = store.commit(staging, Manifest(id="base-1", files=hash_files(staging)))
    output = store.staging_dir()
    progress = []
    context = OptimizationContext(output_dir=output, progress=lambda f, m: progress.append(f))
    derived = optimizer.apply(parent, context)
    committed = store.commit(derived.path, derived.manifest)
    assert committed.manifest.parent == "base-1"
    assert committed.manifest.step.strategy == "make-greedy"
    assert json.loads((committed.path / "generation_config.json").read_text()) == {
        "do_sample": False,
        "max_new_tokens": 8,
    }
    assert set(committed.manifest.files) == {"config.json", "generation_config.json"}
    assert progress == [0.0, 1.0]
    assert store.get(committed.id).manifest == committed.manifest


def test_serving_backend_example(plugin_manager, tmp_path):
    plugin_manager.register_plugin(example_module("gptstore_serving_backends"), "echo-example")
    record = plugin_manager.get(ServingBackend, "echo")
    backend = build(record, {"uppercase": True})
    assert isinstance(backend, Backend)
    artifact = Artifact(Path(tmp_path), Manifest(id="any"))
    runner = backend.load(artifact)
    assert isinstance(runner, Runner)
    request = GenerationRequest(prompt="hello there general", max_tokens=2)
    [generation] = runner.generate([request])
    assert generation.text == "HELLO THERE"
    assert "".join(chunk.text for chunk in runner.stream(request)) == "HELLO THERE"
    assert runner.logprobs(["a b"])[0].tokens == ("a", "b")
    assert runner.chat_prompt([ChatMessage("user", "hi")]) == "user: hi"
    assert runner.count_tokens("a b c") == 3
    assert runner.info() == RunnerInfo(context_length=None, logprobs=False)
    assert runner.health().ok
    runner.close()
