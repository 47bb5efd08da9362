"""The prompt-tuning strategy on a tiny real model: it learns (held-out perplexity and loss
fall), its adapter is committed with lineage and served by the torch backend with peft's own
greedy text and log-probabilities, bad options are clear errors, and a cancelled run leaves no
artifact."""

from __future__ import annotations

import json
import threading
import warnings

import pytest

from gptstore.artifacts import ArtifactStore
from gptstore.errors import Cancelled, GptstoreError
from gptstore.manager import make_plugin_manager
from gptstore.optimization.data import dataset
from gptstore.optimization.run import optimize
from gptstore.testing import add_artifact
from gptstore.testing.contracts import OptimizerContract
from gptstore.types import GenerationRequest
from gptstore_prompt_tuning import plugin
from gptstore_torch import plugin as torch_plugin

VIRTUAL = 8
FAST = {
    "num_virtual_tokens": VIRTUAL,
    "max_steps": 20,
    "seq_len": 32,
    "batch_size": 4,
    "learning_rate": 0.3,
    "warmup_steps": 2,
}
#: Small, regular data: a few blocks (quick to measure) that a random model can be steered on.
DATA = dataset(["The assignment statement binds names to objects. " * 40], "test text")
PROMPTS = ["Hello world", "The quick brown fox jumps over the", "a"]


@pytest.fixture(scope="module")
def manager():
    return make_plugin_manager(
        entrypoints=False, extra=[("prompt-tuning", plugin), ("torch", torch_plugin)]
    )


def _store(root, model):
    return ArtifactStore.of(add_artifact(root / "home" / "artifacts", model, "base"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, manager):
    """(store, adapter): the base and one adapter trained on DATA, shared by the tests."""
    store = _store(tmp_path_factory.mktemp("trained"), tiny_model)
    return store, optimize(manager, store, "base", "prompt-tuning", FAST, data=DATA)


def test_the_adapter_learns_and_is_committed_with_lineage(trained):
    store, adapter = trained
    manifest = adapter.manifest
    assert (manifest.kind, manifest.parent) == ("adapter", "base")
    assert [a.id for a in store.lineage(adapter)] == [adapter.id, "base"]
    assert manifest.step is not None
    assert (manifest.step.strategy, manifest.step.options["num_virtual_tokens"]) == (
        "prompt-tuning",
        VIRTUAL,
    )
    assert manifest.data_digest == DATA.digest
    before = manifest.metrics_before["heldout_perplexity"]
    assert manifest.metrics_after["heldout_perplexity"] < before
    hidden = json.loads((store.get("base").path / "config.json").read_text())["hidden_size"]
    assert manifest.metrics_after["trainable_parameters"] == VIRTUAL * hidden
    assert 0 < manifest.metrics_after["trainable_share"] < 0.01
    for name in ("steps", "final_loss", "wall_time_s", "peak_rss_bytes", "heldout_blocks"):
        assert manifest.metrics_after[name] > 0, name
    losses = json.loads((adapter.path / "training_log.json").read_text())["loss"]
    assert len(losses) == manifest.metrics_after["steps"] == 20
    assert sum(losses[-5:]) < sum(losses[:5])

    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"]) == ("PROMPT_TUNING", "CAUSAL_LM")
    assert (config["num_virtual_tokens"], config["prompt_tuning_init"]) == (VIRTUAL, "TEXT")
    assert config["tokenizer_name_or_path"] == str(store.get("base").path)  # never the hub
    assert (adapter.path / "adapter_model.safetensors").is_file()
    assert (adapter.path / "tokenizer.json").is_file()
    assert not list(adapter.path.glob("*.bin"))
    assert not (adapter.path / "model.safetensors").exists()  # only the virtual tokens


@pytest.fixture(scope="module")
def reference(trained):
    """peft's own model for the adapter, and the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store, adapter = trained
    base = store.get("base").path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter.path)
    return model.eval(), AutoTokenizer.from_pretrained(base)


def peft_greedy(reference, prompt: str, max_new_tokens: int) -> str:
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt")
    with warnings.catch_warnings():  # peft ignores position ids, and says so
        warnings.simplefilter("ignore", UserWarning)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True))


def test_the_torch_backend_serves_it_as_peft_generates(trained, reference, manager):
    import torch

    from gptstore.serving.deployments import load_runner, plan

    store, adapter = trained
    runner = load_runner(plan(manager, store, adapter.id, "torch", {}))
    plain = load_runner(plan(manager, store, "base", "torch", {}))
    try:
        expected = [peft_greedy(reference, p, 10) for p in PROMPTS]
        alone = [runner.generate([GenerationRequest(prompt=p, max_tokens=10)])[0] for p in PROMPTS]
        assert [a.text for a in alone] == expected
        batched = runner.generate([GenerationRequest(prompt=p, max_tokens=10) for p in PROMPTS])
        assert [b.text for b in batched] == expected
        assert batched[0].prompt_tokens == len(reference[1](PROMPTS[0])["input_ids"])
        without = plain.generate([GenerationRequest(prompt=p, max_tokens=10) for p in PROMPTS])
        assert [w.text for w in without] != expected  # the virtual tokens change the answers
        assert runner.info().context_length == plain.info().context_length - VIRTUAL

        text = "The assignment statement binds names"
        [scored] = runner.logprobs([text])
        model, tokenizer = reference
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, VIRTUAL:-1]  # after the virtual tokens
        picked = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
        assert scored.logprobs[0] is None
        assert scored.logprobs[1:] == pytest.approx(picked.tolist(), abs=1e-4)
    finally:
        runner.close()
        plain.close()


def test_pip_install_adds_the_strategy():
    from gptstore.testing import run_cli

    listed = json.loads(run_cli("plugins", "--json").stdout)
    [found] = [p for p in listed if p["name"] == "prompt-tuning"]
    assert (found["status"], found["distribution"]) == ("loaded", "gptstore-prompt-tuning")
    assert "optimization strategy: prompt-tuning" in found["provides"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"num_virtual_tokens": 0},
            r"num_virtual_tokens must lie in 1\.\.1024, got 0 @ \$\.options\.num_virtual_tokens",
        ),
        (
            {"prompt_tuning_init_text": "  "},
            r"prompt_tuning_init_text must not be blank @ \$\.options\.prompt_tuning_init_text",
        ),
        ({"learning_rate": 0}, r"learning_rate must lie in \(0, 10\], got 0"),
        ({"r": 4}, r"extra fields found \(r\) @ \$\.options"),  # a lora option
        (
            {**FAST, "seq_len": 2045},
            "num_virtual_tokens 8 plus seq_len 2045 exceed the model's context of 2048 tokens",
        ),
        ({**FAST, "seq_len": 1024}, "at least 2 blocks"),
    ],
)
def test_wrong_options_are_clear_errors(tmp_path, tiny_model, manager, options, message):
    store = _store(tmp_path, tiny_model)
    with pytest.raises(GptstoreError, match=message):
        optimize(manager, store, "base", "prompt-tuning", options, data=DATA)
    assert [a.id for a in store.list()] == ["base"]


def test_a_cancelled_run_leaves_no_artifact(tmp_path, tiny_model, manager):
    store = _store(tmp_path, tiny_model)
    cancel = threading.Event()
    seen: list[str] = []

    def progress(_fraction: float, message: str) -> None:
        seen.append(message)
        if message.startswith("step 3/"):
            cancel.set()  # as a user's Ctrl-C or a cancelled job does, midway through training

    with pytest.raises(Cancelled):
        optimize(
            manager,
            store,
            "base",
            "prompt-tuning",
            {**FAST, "max_steps": 1000},
            data=DATA,
            progress=progress,
            cancel=cancel,
            new_id="never",
        )
    assert seen[-1].startswith("step 3/1000")
    assert [a.id for a in store.list()] == ["base"]
    assert not (store.root / "never").exists()
    assert not list(store.root.glob(".staging-*"))


class TestPromptTuningContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        from gptstore_prompt_tuning.train import PromptTuning, PromptTuningOptions

        return PromptTuning(
            PromptTuningOptions(
                num_virtual_tokens=2, max_steps=2, seq_len=16, batch_size=2, eval_fraction=0.0
            )
        )

    @pytest.fixture
    def parent(self, tmp_path, tiny_model):
        return _store(tmp_path, tiny_model).get("base")
