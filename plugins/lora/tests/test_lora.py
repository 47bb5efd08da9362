"""The lora strategy on tiny real models: it learns (held-out perplexity falls), its adapter is
served by the torch backend, a merged model of tied embeddings reloads with plain transformers
and gives the adapter's logits, and a run stopped midway leaves no half artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gptstore.artifacts import ArtifactStore
from gptstore.optimization.run import optimize
from gptstore.testing import add_artifact
from gptstore.testing.contracts import OptimizerContract
from gptstore.testing.models import build_causal_lm
from gptstore.types import GenerationRequest
from gptstore_lora import plugin
from gptstore_lora.train import Lora, LoraOptions

FAST = {"r": 4, "max_steps": 30, "seq_len": 64, "batch_size": 4, "dropout": 0.0}


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    # SmolLM2 ties its input and output embeddings: merged models must survive a reload.
    return build_causal_lm(
        tmp_path_factory.mktemp("tied") / "tied", tie_word_embeddings=True, hidden_size=64
    )


def _store(tmp_path, model):
    return ArtifactStore.of(add_artifact(tmp_path / "home" / "artifacts", model, "base"))


@pytest.fixture
def manager():
    from gptstore.manager import make_plugin_manager
    from gptstore_torch import plugin as torch_plugin

    return make_plugin_manager(entrypoints=False, extra=[("lora", plugin), ("torch", torch_plugin)])


def test_the_adapter_learns_and_is_served_unmerged(tmp_path, tiny_model, manager):
    store = _store(tmp_path, tiny_model)
    adapter = optimize(manager, store, "base", "lora", FAST)
    manifest = adapter.manifest
    assert (manifest.kind, manifest.parent) == ("adapter", "base")
    assert (
        manifest.metrics_after["heldout_perplexity"] < manifest.metrics_before["heldout_perplexity"]
    )
    assert 0 < manifest.metrics_after["trainable_share"] < 0.1
    assert manifest.step.options["r"] == 4
    losses = json.loads((adapter.path / "training_log.json").read_text())["loss"]
    assert len(losses) == 30
    assert losses[-1] < losses[0]
    assert (adapter.path / "adapter_model.safetensors").is_file()
    assert not list(adapter.path.glob("*.bin"))
    from gptstore.serving.deployments import load_runner, plan

    runner = load_runner(plan(manager, store, adapter.id, "torch", {}))
    try:
        [answer] = runner.generate([GenerationRequest(prompt="The", max_tokens=4)])
        assert answer.completion_tokens > 0
    finally:
        runner.close()


def test_a_merged_model_of_tied_embeddings_reloads_with_the_adapters_logits(
    tmp_path, tied_model, manager
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store = _store(tmp_path, tied_model)
    adapter = optimize(manager, store, "base", "lora", FAST)
    merged = optimize(manager, store, "base", "lora", {**FAST, "merge": True})
    assert merged.manifest.kind == "hf"
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True, use_safetensors=True
        ).eval()

    with torch.inference_mode():
        on_base = PeftModel.from_pretrained(load(store.get("base").path), adapter.path).eval()
        expected = on_base(input_ids=ids).logits
        reloaded = load(merged.path)
        assert reloaded.config.tie_word_embeddings
        got = reloaded(input_ids=ids).logits
        untrained = load(store.get("base").path)(input_ids=ids).logits
    assert float((got - expected).abs().max()) < 1e-4
    assert float((got - untrained).abs().max()) > 1e-3  # the training is in the merged weights


def test_dora_trains_with_peft_on_this_stack(tmp_path, tiny_model, manager):
    store = _store(tmp_path, tiny_model)
    dora = optimize(manager, store, "base", "lora", {**FAST, "use_dora": True})
    config = json.loads((dora.path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    after = dora.manifest.metrics_after["heldout_perplexity"]
    assert after < dora.manifest.metrics_before["heldout_perplexity"]


def test_pip_install_adds_the_strategy():
    from gptstore.testing import run_cli

    listed = json.loads(run_cli("plugins", "--json").stdout)
    [lora] = [p for p in listed if p["name"] == "lora"]
    assert (lora["status"], lora["distribution"]) == ("loaded", "gptstore-lora")
    assert "optimization strategy: lora" in lora["provides"]


def test_wrong_inputs_are_refused(tmp_path, tiny_model, manager):
    from gptstore.errors import GptstoreError

    store = _store(tmp_path, tiny_model)
    with pytest.raises(GptstoreError, match="at least 2 blocks"):
        optimize(manager, store, "base", "lora", {**FAST, "seq_len": 1_000_000})
    with pytest.raises(GptstoreError, match=r"r must lie in 1\.\.1024, got 0 @ \$\.options\.r"):
        optimize(manager, store, "base", "lora", {"r": 0})
    assert [a.id for a in store.list()] == ["base"]


class TestLoraContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return Lora(LoraOptions(r=2, max_steps=2, seq_len=32, batch_size=2))

    @pytest.fixture
    def parent(self, tmp_path, tiny_model):
        return _store(tmp_path, tiny_model).get("base")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_run_stopped_midway_leaves_no_half_artifact(tmp_path, tiny_model, sig):
    store = _store(tmp_path, tiny_model)
    home = tmp_path / "home"
    process = subprocess.Popen(
        [sys.executable, "-m", "gptstore.cli", "--home", str(home), "optimize", "base", "lora",
         "--option", "max_steps=100000", "--option", "seq_len=32", "--id", "never"],
        env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Ctrl-C as in a terminal, even when this test runs where SIGINT is ignored (a
        # background job of a shell without job control): ignored signals are inherited.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(store.root.glob(".staging-*")):  # training has begun writing nothing yet
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)
    process.send_signal(sig)
    process.wait(60)
    assert [a.id for a in store.list()] == ["base"]
    assert not (store.root / "never").exists()
    if sig == signal.SIGINT:  # a clean stop also removes its staging folder
        assert not list(store.root.glob(".staging-*"))
