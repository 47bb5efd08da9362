"""The pruning strategies on tiny real models: each result loads with plain transformers, has
what it says it kept, generates the same with and without its KV cache, exports to ONNX, and is
served by the torch and onnx backends alike."""

from __future__ import annotations

import json

import pytest

from gptstore.artifacts import ArtifactStore
from gptstore.optimization.run import optimize
from gptstore.plugin import default_heldout
from gptstore.testing import add_artifact
from gptstore.testing.contracts import OptimizerContract
from gptstore.types import GenerationRequest
from gptstore_prune import plugin
from gptstore_prune.heads import PruneHeads, PruneHeadsOptions, prune_groups
from gptstore_prune.layers import PruneLayers, PruneLayersOptions, drop_layers
from gptstore_prune.mlp import PruneMlp, PruneMlpOptions
from gptstore_prune.pruning import DEFAULT_DATA_DIGEST, perplexity, token_blocks

FAST = {"calibration_tokens": 512, "eval_tokens": 256, "seq_len": 64}
HEAD_DIM = 16


def _store(tmp_path, model):
    return ArtifactStore.of(add_artifact(tmp_path / "home" / "artifacts", model, "base"))


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory):
    """4 layers, 6 query heads over 2 key/value heads (groups of 3, as in SmolLM2)."""
    pytest.importorskip("transformers")
    from gptstore.testing.models import build_causal_lm

    return build_causal_lm(
        tmp_path_factory.mktemp("gqa") / "gqa",
        hidden_size=6 * HEAD_DIM,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=128,
    )


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _greedy(model, tokenizer, *, use_cache):
    encoded = tokenizer(["The assignment statement"], return_tensors="pt")
    out = model.generate(
        **encoded, max_new_tokens=12, do_sample=False, use_cache=use_cache, min_new_tokens=12
    )
    return out[0, encoded["input_ids"].shape[1] :].tolist()


def _check_plain_model(pruned, base, reloaded, tokenizer, cut):
    """``reloaded`` (the artifact through plain transformers) has the manifest's parameter count
    and perplexity; ``base`` cut in process by ``cut`` generates what ``reloaded`` generates,
    with and without the KV cache."""
    manifest = pruned.manifest
    assert manifest.data_digest == DEFAULT_DATA_DIGEST
    assert manifest.metrics_after["parameters"] < manifest.metrics_before["parameters"]
    assert sum(p.numel() for p in reloaded.parameters()) == manifest.metrics_after["parameters"]
    assert manifest.metrics_before["heldout_perplexity"] > 1
    # What the strategy measured in process is what the saved model computes.
    heldout = token_blocks(
        tokenizer, default_heldout().texts(), FAST["eval_tokens"], FAST["seq_len"]
    )
    assert perplexity(reloaded, heldout) == pytest.approx(
        manifest.metrics_after["heldout_perplexity"], rel=1e-4
    )
    cut(base)
    with_cache = _greedy(reloaded, tokenizer, use_cache=True)
    assert with_cache == _greedy(reloaded, tokenizer, use_cache=False)
    assert with_cache == _greedy(base, tokenizer, use_cache=True)


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


def test_prune_heads_removes_whole_groups_and_leaves_a_plain_model(tmp_path, gqa_model, manager):
    import torch

    store = _store(tmp_path, gqa_model)
    pruned = optimize(manager, store, "base", "prune-heads", {**FAST, "fraction": 0.5})
    manifest = pruned.manifest
    assert manifest.step.options == {**FAST, "fraction": 0.5, "importance": "output"}
    assert manifest.metrics_after["num_attention_heads"] == 3
    assert manifest.metrics_after["num_key_value_heads"] == 1
    config = json.loads((pruned.path / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (3, 1)
    assert (config["head_dim"], config["hidden_size"]) == (HEAD_DIM, 6 * HEAD_DIM)
    record = json.loads((pruned.path / "pruning.json").read_text())
    assert record["num_key_value_heads"] == [2, 1]
    kept = record["kept"]
    assert [len(groups) for groups in kept] == [1, 1, 1, 1]

    base, tokenizer = _load(store.get("base").path)
    reloaded, _ = _load(pruned.path)
    for layer, cut, [group] in zip(base.model.layers, reloaded.model.layers, kept, strict=True):
        was, now = layer.self_attn, cut.self_attn
        query = slice(group * 3 * HEAD_DIM, (group + 1) * 3 * HEAD_DIM)
        kv = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
        assert torch.equal(now.q_proj.weight, was.q_proj.weight[query])
        assert torch.equal(now.k_proj.weight, was.k_proj.weight[kv])
        assert torch.equal(now.v_proj.weight, was.v_proj.weight[kv])
        assert torch.equal(now.o_proj.weight, was.o_proj.weight[:, query])
    _check_plain_model(pruned, base, reloaded, tokenizer, lambda model: prune_groups(model, kept))


def test_prune_layers_drops_the_least_influential_and_leaves_a_plain_model(
    tmp_path, gqa_model, manager
):
    import torch

    store = _store(tmp_path, gqa_model)
    pruned = optimize(manager, store, "base", "prune-layers", {**FAST, "count": 2})
    manifest = pruned.manifest
    assert manifest.step.options == {**FAST, "count": 2, "fraction": None}
    assert manifest.metrics_after["num_hidden_layers"] == 2
    assert json.loads((pruned.path / "config.json").read_text())["num_hidden_layers"] == 2
    record = json.loads((pruned.path / "pruning.json").read_text())
    kept, influence = record["kept"], record["block_influence"]
    assert record["num_hidden_layers"] == [4, 2]
    assert sorted(kept + record["dropped"]) == [0, 1, 2, 3]
    assert max(influence[i] for i in record["dropped"]) <= min(influence[i] for i in kept)

    base, tokenizer = _load(store.get("base").path)
    reloaded, _ = _load(pruned.path)
    for index, layer in zip(kept, reloaded.model.layers, strict=True):
        assert torch.equal(
            layer.mlp.down_proj.weight, base.model.layers[index].mlp.down_proj.weight
        )
    _check_plain_model(pruned, base, reloaded, tokenizer, lambda model: drop_layers(model, kept))
    assert [layer.self_attn.layer_idx for layer in base.model.layers] == [0, 1]


def _llama(**config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 6 * HEAD_DIM, "intermediate_size": 64, "num_hidden_layers": 3}
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, **shape, **config)).eval()


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_removing_head_groups_equals_silencing_them_biases_included():
    """Attention with biases, 3 groups of 2 query heads, the middle group removed: the same
    logits as the whole model with that group's attention output zeroed before o_proj."""
    import torch

    model = _llama(num_attention_heads=6, num_key_value_heads=3, attention_bias=True)
    ids = torch.arange(1, 17)[None]
    width = 2 * HEAD_DIM

    def silence(_module, inputs):
        x = inputs[0].clone()
        x[..., width : 2 * width] = 0
        return (x,)

    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(silence) for layer in model.model.layers
    ]
    silenced = _logits(model, ids)
    for handle in handles:
        handle.remove()
    prune_groups(model, [[0, 2]] * 3)
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (4 * HEAD_DIM,)
    assert torch.allclose(_logits(model, ids), silenced, atol=1e-5)
    assert model.config.head_dim == HEAD_DIM


def test_dropping_layers_equals_skipping_them():
    import torch

    model = _llama(num_attention_heads=6, num_key_value_heads=2)
    ids = torch.arange(1, 17)[None]

    def skip(_module, args, kwargs, _output):
        return args[0] if args else kwargs["hidden_states"]

    handle = model.model.layers[1].register_forward_hook(skip, with_kwargs=True)
    skipped = _logits(model, ids)
    handle.remove()
    drop_layers(model, [0, 2])
    assert torch.allclose(_logits(model, ids), skipped, atol=1e-5)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


@pytest.mark.parametrize(
    ("model", "strategy", "options"),
    [
        ("tiny_model", "prune-mlp", {"fraction": 0.25}),
        ("gqa_model", "prune-heads", {"fraction": 0.5}),
        ("gqa_model", "prune-layers", {"count": 1}),
    ],
)
def test_pruned_models_export_to_onnx_and_are_served_there(
    tmp_path, manager, request, model, strategy, options
):
    from gptstore.serving.deployments import load_runner, plan
    from gptstore_onnx import plugin as onnx_plugin

    manager.register_plugin(onnx_plugin, "onnx")
    store = _store(tmp_path, request.getfixturevalue(model))
    optimize(manager, store, "base", strategy, {**FAST, **options}, new_id="pruned")
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


@pytest.mark.parametrize(
    ("strategy", "options", "message"),
    [
        (
            "prune-mlp",
            {"fraction": 0},
            r"fraction must lie in \(0, 0\.95\], got 0 @ \$\.options\.fraction",
        ),
        ("prune-mlp", {"multiple_of": 4096}, r"multiple_of 4096 is not below the MLP width"),
        ("prune-heads", {"fraction": 0}, r"fraction must lie in \(0, 0\.95\]"),
        ("prune-heads", {"fraction": 0.2}, r"fraction 0\.2 of 2 key/value head groups .*none"),
        ("prune-heads", {"fraction": 0.8}, r"fraction 0\.8 of 2 .* removes all of them"),
        (
            "prune-heads",
            {"importance": "magic"},
            r"importance must be one of output, activation; got 'magic'",
        ),
        ("prune-layers", {"count": 0}, r"count must lie in 1\.\.65536, got 0"),
        (
            "prune-layers",
            {"count": 4},
            r"count 4 would drop all 4 decoder layers; at most 3 can go",
        ),
        ("prune-layers", {"count": 1, "fraction": 0.5}, r"give count or fraction, not both"),
    ],
)
def test_a_wrong_option_is_refused_and_keeps_nothing(
    tmp_path, gqa_model, manager, strategy, options, message
):
    from gptstore.errors import GptstoreError

    store = _store(tmp_path, gqa_model)
    with pytest.raises(GptstoreError, match=message):
        optimize(manager, store, "base", strategy, options)
    assert [a.id for a in store.list()] == ["base"]


@pytest.fixture(scope="session")
def gpt2_model(tmp_path_factory):
    """A tiny GPT-2: fused attention projections, no ``model.layers``."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptstore.testing.models import tokenizer

    tok = tokenizer()
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy", ["prune-mlp", "prune-heads", "prune-layers"])
def test_other_architectures_are_refused_by_name(tmp_path, gpt2_model, manager, strategy):
    from gptstore.errors import InvalidInput

    store = _store(tmp_path, gpt2_model)
    with pytest.raises(InvalidInput, match=f"{strategy} takes Llama-style .*GPT2LMHeadModel"):
        optimize(manager, store, "base", strategy, FAST)


class TestPruneMlpContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return PruneMlp(PruneMlpOptions(**FAST))

    @pytest.fixture
    def parent(self, tmp_path, tiny_model):
        return _store(tmp_path, tiny_model).get("base")


class TestPruneHeadsContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return PruneHeads(PruneHeadsOptions(**FAST, fraction=0.5))

    @pytest.fixture
    def parent(self, tmp_path, gqa_model):
        return _store(tmp_path, gqa_model).get("base")


class TestPruneLayersContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return PruneLayers(PruneLayersOptions(**FAST, fraction=0.25))

    @pytest.fixture
    def parent(self, tmp_path, gqa_model):
        return _store(tmp_path, gqa_model).get("base")


def test_pip_install_adds_the_strategies():
    from gptstore.testing import run_cli

    listed = json.loads(run_cli("plugins", "--json").stdout)
    [prune] = [p for p in listed if p["distribution"] == "gptstore-prune"]
    assert prune["status"] == "loaded"
    assert prune["provides"] == ["optimization strategy: prune-mlp, prune-heads, prune-layers"]
