"""prune-mlp on tiny real models: the result loads with plain transformers, has the channels it
says it kept, and is served by the torch backend."""

from __future__ import annotations

import json

import pytest

from gptstore.artifacts import ArtifactStore
from gptstore.optimization.run import optimize
from gptstore.testing import add_artifact
from gptstore.testing.contracts import OptimizerContract
from gptstore.types import GenerationRequest
from gptstore_prune import plugin
from gptstore_prune.mlp import PruneMlp, PruneMlpOptions

FAST = {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64}


def _store(tmp_path, model):
    return ArtifactStore.of(add_artifact(tmp_path / "home" / "artifacts", model, "base"))


@pytest.fixture
def manager():
    from gptstore.manager import make_plugin_manager
    from gptstore_torch import plugin as torch_plugin

    return make_plugin_manager(
        entrypoints=False, extra=[("prune", plugin), ("torch", torch_plugin)]
    )


def test_pruned_models_are_plain_smaller_and_served(tmp_path, tiny_model, manager):
    import torch
    from transformers import AutoModelForCausalLM

    store = _store(tmp_path, tiny_model)
    pruned = optimize(manager, store, "base", "prune-mlp", {**FAST, "fraction": 0.5})
    manifest = pruned.manifest
    width = json.loads((tiny_model / "config.json").read_text())["intermediate_size"]
    assert manifest.metrics_after["intermediate_size"] == width // 2
    assert manifest.metrics_after["parameters"] < manifest.metrics_before["parameters"]
    assert json.loads((pruned.path / "config.json").read_text())["intermediate_size"] == width // 2
    kept = json.loads((pruned.path / "pruning.json").read_text())["kept"]
    assert [len(k) for k in kept] == [width // 2, width // 2]
    assert all(k == sorted(set(k)) for k in kept)

    base = AutoModelForCausalLM.from_pretrained(store.get("base").path, local_files_only=True)
    reloaded = AutoModelForCausalLM.from_pretrained(pruned.path, local_files_only=True)
    layer, cut = base.model.layers[0].mlp, reloaded.model.layers[0].mlp
    assert torch.equal(cut.gate_proj.weight, layer.gate_proj.weight[kept[0]])
    assert torch.equal(cut.down_proj.weight, layer.down_proj.weight[:, kept[0]])
    assert sum(p.numel() for p in reloaded.parameters()) == manifest.metrics_after["parameters"]

    from gptstore.serving.deployments import load_runner, plan

    runner = load_runner(plan(manager, store, pruned.id, "torch", {}))
    try:
        [answer] = runner.generate([GenerationRequest(prompt="The", max_tokens=4)])
        assert answer.completion_tokens > 0
    finally:
        runner.close()


def test_pruned_models_export_to_onnx_and_are_served_there(tmp_path, tiny_model, manager):
    from gptstore.serving.deployments import load_runner, plan
    from gptstore_onnx import plugin as onnx_plugin

    manager.register_plugin(onnx_plugin, "onnx")
    store = _store(tmp_path, tiny_model)
    optimize(manager, store, "base", "prune-mlp", {**FAST, "fraction": 0.25}, new_id="pruned")
    # onnx-export compares its logits with torch's and refuses a difference over 1e-3.
    exported = optimize(manager, store, "pruned", "onnx-export")
    assert exported.manifest.metrics_after["max_logit_diff"] < 1e-3
    request = GenerationRequest(prompt="The", max_tokens=6)
    answers = []
    for artifact, backend in (("pruned", "torch"), (exported.id, "onnx")):
        runner = load_runner(plan(manager, store, artifact, backend, {}))
        try:
            answers.append(runner.generate([request])[0].text)
        finally:
            runner.close()
    assert answers[0] == answers[1]  # greedy: the same model on both backends


def test_a_wrong_fraction_is_refused_and_keeps_nothing(tmp_path, tiny_model, manager):
    from gptstore.errors import GptstoreError

    store = _store(tmp_path, tiny_model)
    with pytest.raises(GptstoreError, match=r"fraction must lie in \(0, 0\.95\]"):
        optimize(manager, store, "base", "prune-mlp", {"fraction": 0})
    assert [a.id for a in store.list()] == ["base"]


class TestPruneMlpContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return PruneMlp(PruneMlpOptions(**FAST))

    @pytest.fixture
    def parent(self, tmp_path, tiny_model):
        return _store(tmp_path, tiny_model).get("base")
