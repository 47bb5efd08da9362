"""Export, quantize and serve a real tiny model with ONNX Runtime, against torch."""

from __future__ import annotations

import shutil

import pytest

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.optimization.gates import GateFailed
from gptstore.optimization.run import optimize
from gptstore.records import ServingBackend
from gptstore.testing.contracts import (
    BackendContract,
    ContinuousBatchingContract,
    OptimizerContract,
)
from gptstore.types import GenerationRequest, Manifest
from gptstore_onnx.quantize import OnnxQuantize, QuantizeOptions
from gptstore_onnx.runner import OrtBackend, OrtOptions

PROMPTS = ["Hello world", "The quick brown fox jumps over the", "a"]


def operator_counts(path):
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def repeated_caches(path):
    """Cache outputs that the graph repeats per query head (transformers' repeat_kv)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [
        name
        for n in model.graph.node
        if n.op_type == "Unsqueeze"
        for name in n.input
        if name.startswith("present.")
    ]


def constant_matmuls(path):
    """MatMul nodes whose weight is an initializer: what weight-only quantization should take."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def test_export_records_lineage_and_logit_difference(exported):
    _manager, store, base, onnx, progress = exported
    manifest = onnx.manifest
    assert (manifest.kind, manifest.parent, manifest.step.strategy) == (
        "onnx",
        base.id,
        "onnx-export",
    )
    assert manifest.metrics_after["max_logit_diff"] < 1e-3
    operators = operator_counts(onnx.path / "model.onnx")
    # 2 layers: rotary embeddings on q and k, residual + RMSNorm fused.
    assert operators["RotaryEmbedding"] == 4
    assert operators["SkipSimplifiedLayerNormalization"] >= 3
    assert manifest.metrics_after["fused_operators"] >= 7
    # Per layer: q, k, v packed; o; gate and up packed; down. And the output projection.
    assert len(constant_matmuls(onnx.path / "model.onnx")) == 2 * 4 + 1
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx.path / "model.onnx"), load_external_data=False).graph
    tables = {
        i.name: list(i.dims) for i in graph.initializer if i.name in ("cos_cache", "sin_cache")
    }
    assert tables == {"cos_cache": [2048, 16], "sin_cache": [2048, 16]}  # the tiny model's context
    assert repeated_caches(onnx.path / "model.onnx") == []  # grouped attention reads them as is
    assert "model.onnx" in manifest.files
    assert {"tokenizer.json", "config.json"} <= set(manifest.files)
    assert progress[-1] == 1.0
    assert store.get(onnx.id).manifest == manifest
    assert not [p for p in store.root.iterdir() if p.name.startswith(".staging")]


def test_onnx_runner_matches_torch_greedy(exported, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manager, _store, _base, onnx, _ = exported
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(onnx)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    results = runner.generate([GenerationRequest(prompt=p, max_tokens=10) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, results, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
        assert result.text == tokenizer.decode(
            out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True
        )
    request = GenerationRequest(prompt="Hello world", max_tokens=10)
    assert "".join(c.text for c in runner.stream(request)) == results[0].text
    assert runner.health().message == "onnxruntime CPUExecutionProvider (shared KV buffer)"
    [scored] = runner.logprobs(["The quick brown fox"])
    assert scored.logprobs[0] is None
    assert all(v < 0 for v in scored.logprobs[1:])
    runner.close()


def test_io_binding_decodes_the_same(exported):
    """IOBinding is on by default only on GPU providers; forced on the CPU, the bound path
    (the cache passed from step to step as OrtValues) must give the same tokens and scores."""
    manager, _store, _base, onnx, _ = exported
    record = manager.get(ServingBackend, "onnx")
    plain = record.factory(OrtOptions(shared_cache=False)).load(onnx)
    bound = record.factory(OrtOptions(io_binding=True, shared_cache=False)).load(onnx)
    assert (plain.io_binding, bound.io_binding) == (False, True)
    assert bound.health().message == "onnxruntime CPUExecutionProvider (IOBinding)"
    same_answers(plain, bound)
    plain.close()
    bound.close()


def same_answers(plain, other, max_tokens=12):
    """``other`` answers as ``plain``: greedy and sampled tokens, streamed, and scores."""
    requests = [GenerationRequest(prompt=p, max_tokens=max_tokens) for p in PROMPTS]
    assert [g.text for g in other.generate(requests)] == [g.text for g in plain.generate(requests)]
    request = GenerationRequest(prompt="Hello world", max_tokens=12, temperature=0.8, seed=3)
    assert "".join(c.text for c in other.stream(request)) == "".join(
        c.text for c in plain.stream(request)
    )
    [a], [b] = plain.logprobs(["The quick brown fox"]), other.logprobs(["The quick brown fox"])
    assert a.logprobs[1:] == pytest.approx(b.logprobs[1:], abs=1e-5)


def test_shared_cache_decodes_the_same_and_grows(exported):
    """The lean graph's attention appends into one buffer per layer, bound as both past and
    present: the default there. Tokens, scores and the cache itself are those of fresh arrays
    every step, also when a generation outgrows the buffer and moves to a larger one; the
    buffer never holds more than ``kv_positions`` says (what the KV budget counts)."""
    import numpy as np

    from gptstore_onnx.runner import SharedCache

    manager, _store, _base, onnx, _ = exported
    record = manager.get(ServingBackend, "onnx")
    plain = record.factory(OrtOptions(shared_cache=False)).load(onnx)
    shared = record.factory(OrtOptions()).load(onnx)
    assert (plain.shared_cache, shared.shared_cache) == (False, True)
    same_answers(plain, shared)
    # The allocation: ahead of the length, in whole blocks, never past the context (2048).
    assert [shared.kv_positions(n) for n in (1, 100, 1000, 2000, 2048)] == [
        128,
        192,
        1280,
        2048,
        2048,
    ]
    assert plain.kv_positions(100) == 100
    # A 100-token prompt gets 192 positions; 120 new tokens outgrow them.
    ids = shared.decoder.tokenizer(" ".join(["fox"] * 400))["input_ids"][:100]
    prompt = shared.decoder.tokenizer.decode(ids)
    assert shared.count_tokens(prompt) == 100
    request = GenerationRequest(prompt=prompt, max_tokens=120, logprobs=1, logit_bias=((0, -100),))
    [want], [got] = plain.generate([request]), shared.generate([request])
    assert got.completion_tokens == want.completion_tokens
    assert got.text == want.text
    assert [t.logprob for t in got.logprobs] == pytest.approx(
        [t.logprob for t in want.logprobs], abs=1e-5
    )
    # Step by step at the forward level: the same cache as the arrays', grown past 192.
    tokens = np.asarray([ids], dtype=np.int64)
    mask, positions = np.ones_like(tokens), np.arange(tokens.shape[1])[None]
    _logits, state = shared.forward(tokens, mask, positions, None)
    _logits, arrays = plain.forward(tokens, mask, positions, None)
    assert isinstance(state, SharedCache)
    assert (state.length, state.capacity) == (100, 192)
    first = state.values[0]
    for step in range(100):
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        token, where = np.asarray([[ids[step]]]), np.asarray([[100 + step]])
        _logits, state = shared.forward(token, mask, where, state)
        _logits, arrays = plain.forward(token, mask, where, arrays)
        if step == 91:  # the 192nd position: still the first buffer
            assert state.values[0] is first
    assert (state.length, state.capacity) == (200, shared.kv_positions(193))
    assert state.values[0] is not first
    for got_cache, want_cache in zip(state.filled(), arrays, strict=True):
        np.testing.assert_allclose(got_cache, want_cache, rtol=1e-6, atol=1e-6)
    # A device's buffers are read back through their OrtValues: the same positions.
    device_like = SharedCache(state.values, None, state.length, state.binding)
    for a, b in zip(device_like.filled(), state.filled(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(GptstoreError, match="the cache holds 200 positions"):
        shared.forward(np.asarray([[5]]), mask, positions[:, -1:], state)
    plain.close()
    shared.close()


def test_shared_cache_in_a_continuous_batch_that_outgrows_its_buffer(exported):
    """Rows join a running batch (left padding, new buffers) and the batch then grows past its
    buffer, rows leaving on the way: every row answers as alone."""
    from gptstore.serving.continuous import ContinuousBatcher
    from gptstore.testing.contracts import join_while_streaming

    manager, _store, _base, onnx, _ = exported
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(onnx)
    tokenizer = runner.decoder.tokenizer
    ids = tokenizer(" ".join(["fox"] * 400))["input_ids"]
    no_end = tuple((t, -100.0) for t in runner.decoder.eos_ids)
    # 120 positions, then 90 more: the joined batch's buffer (192 positions) fills on the way.
    first = GenerationRequest(prompt=tokenizer.decode(ids[:120]), max_tokens=90, logit_bias=no_end)
    later = [
        GenerationRequest(prompt="The quick brown fox", max_tokens=40, logit_bias=no_end),
        GenerationRequest(
            prompt=tokenizer.decode(ids[:30]), max_tokens=80, temperature=0.7, seed=1
        ),
    ]
    batcher = ContinuousBatcher(runner, "grow", max_batch=4, max_queue=8)
    text, answers = join_while_streaming(batcher, first, later)
    [alone] = runner.generate([first])
    assert alone.completion_tokens == 90
    assert text == alone.text
    for request, answer in zip(later, answers, strict=True):
        assert answer.text == runner.generate([request])[0].text
    assert batcher.stats.largest == 3
    runner.close()


def test_the_lean_graph_computes_only_the_logits_asked_for(exported):
    """``logits_to_keep``: a generating step asks for its last position's logits alone (the
    others over the vocabulary cost time and memory); scoring asks for all."""
    import numpy as np

    manager, _store, _base, onnx, _ = exported
    for options in (OrtOptions(), OrtOptions(shared_cache=False)):
        runner = manager.get(ServingBackend, "onnx").factory(options).load(onnx)
        assert runner.keeps_logits
        ids = runner.tokenizer(["The quick brown fox jumps"], return_tensors="np")["input_ids"]
        mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
        every, _ = runner.forward(ids, mask, positions, None)
        last, _ = runner.forward(ids, mask, positions, None, keep=1)
        two, _ = runner.forward(ids, mask, positions, None, keep=2)
        assert every.shape == (1, ids.shape[1], runner.vocab_size)
        assert (last.shape[1], two.shape[1]) == (1, 2)
        np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(two, every[:, -2:], rtol=1e-5, atol=1e-5)
        runner.close()


def test_quantize_measures_perplexity_and_serves(exported):
    manager, store, _base, onnx, _ = exported
    quantized = optimize(manager, store, onnx.id, "onnx-quantize")
    manifest = quantized.manifest
    assert (manifest.parent, manifest.step.strategy) == (onnx.id, "onnx-quantize")
    before, after = manifest.metrics_before["perplexity"], manifest.metrics_after["perplexity"]
    assert before > 1
    assert after > 1
    assert manifest.metrics_after["perplexity_change"] == pytest.approx(after / before - 1)
    size = (quantized.path / "model.onnx").stat().st_size
    assert constant_matmuls(quantized.path / "model.onnx") == []
    assert operator_counts(quantized.path / "model.onnx")["MatMulNBits"] == 2 * 4 + 1
    assert size < (onnx.path / "model.onnx").stat().st_size
    dynamic = optimize(manager, store, onnx.id, "onnx-quantize", {"method": "dynamic"})
    assert dynamic.manifest.step.options["method"] == "dynamic"
    assert (dynamic.path / "model.onnx").stat().st_size < (onnx.path / "model.onnx").stat().st_size
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(quantized)
    [result] = runner.generate([GenerationRequest(prompt="Hello", max_tokens=5)])
    assert result.completion_tokens >= 1 or result.finish_reason == "stop"
    runner.close()


def test_int4_blocks_halve_int8_and_serve_what_onnx_runtime_computes(exported):
    """bits = 4: every constant MatMul becomes a 4-bit MatMulNBits (the weights' bytes about
    half of int8's), its perplexity is measured and recorded, and it serves; 4 bits is
    weight-only, and a block size that is no power of two is refused before anything runs."""
    import onnx as onnx_lib

    manager, store, _base, onnx, _ = exported
    int8 = optimize(manager, store, onnx.id, "onnx-quantize", {"block_size": 32}, new_id="q8")
    int4 = optimize(
        manager,
        store,
        onnx.id,
        "onnx-quantize",
        {"bits": 4, "block_size": 32, "symmetric": False},
        new_id="q4",
    )
    model = onnx_lib.load(str(int4.path / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {4}
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert constant_matmuls(int4.path / "model.onnx") == []
    options = int4.manifest.step.options
    assert (options["bits"], options["symmetric"]) == (4, False)
    assert int4.manifest.metrics_after["perplexity"] > 1

    def weight_bytes(artifact):
        loaded = onnx_lib.load(str(artifact.path / "model.onnx"))
        used = {
            n for node in loaded.graph.node if node.op_type == "MatMulNBits" for n in node.input
        }
        return sum(len(i.raw_data) for i in loaded.graph.initializer if i.name in used)

    assert weight_bytes(int4) < 0.6 * weight_bytes(int8)
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(int4)
    [result] = runner.generate([GenerationRequest(prompt="Hello", max_tokens=5)])
    assert result.completion_tokens >= 1 or result.finish_reason == "stop"
    runner.close()
    with pytest.raises(GptstoreError, match="4 bits is weight-only"):
        optimize(manager, store, onnx.id, "onnx-quantize", {"method": "dynamic", "bits": 4})
    with pytest.raises(GptstoreError, match="block_size must be a power of two"):
        optimize(manager, store, onnx.id, "onnx-quantize", {"bits": 4, "block_size": 48})


def test_wrong_inputs_are_refused_and_leave_the_store_as_it_was(exported):
    manager, store, base, onnx, _ = exported
    before = sorted(p.name for p in store.root.iterdir())
    with pytest.raises(GptstoreError, match="takes an ONNX artifact"):
        optimize(manager, store, base.id, "onnx-quantize")
    with pytest.raises(GptstoreError, match="takes a Hugging Face format artifact"):
        optimize(manager, store, onnx.id, "onnx-export")
    with pytest.raises(GateFailed, match=r"max logit difference from torch .*, outside its gate"):
        optimize(manager, store, base.id, "onnx-export", {"max_logit_diff": 0.0})
    assert sorted(p.name for p in store.root.iterdir()) == before


def test_optimize_from_the_command_line(tmp_path, tiny_model):
    from gptstore.testing import run_cli

    home = tmp_path / "home"
    store = ArtifactStore(home / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "m")
    store.commit(staging / "m", Manifest(id="tiny-cli", files=hash_files(staging / "m")))
    store.discard(staging)
    env = {"GPTSTORE_HOME": str(home), "GPTSTORE_LOAD_PLUGINS": "onnx"}
    result = run_cli(
        "optimize", "tiny-cli", "onnx-export", "--option", "max_logit_diff=0.01", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "tiny-cli -> tiny.onnx-export-" in result.stdout
    assert "max_logit_diff:" in result.stdout
    # One line per stage, not pages of tracer warnings.
    stages = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if line.strip()]
    assert stages == [
        "writing the lean graph from the weights",
        "comparing logits with the torch model",
        "done",
    ], result.stderr
    named = [
        run_cli("optimize", "tiny-cli", "onnx-export", "--id", "tiny-onnx", env=env)
        for _ in range(2)
    ]  # the second reuses the first
    assert [r.stdout.splitlines()[0] for r in named] == ["tiny-cli -> tiny-onnx (onnx)"] * 2
    answer = run_cli(
        "chat", "tiny-onnx", "hello", "--backend", "onnx", "--max-tokens", "4", env=env
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()
    bad = run_cli("optimize", "tiny-cli", "onnx-export", "--option", "max_logit_diff=big", env=env)
    assert bad.returncode == 1
    assert "expected float, got str @ $.options.max_logit_diff" in bad.stderr


def test_tied_output_embedding_is_quantized_and_plain_export_still_serves(tmp_path):
    """Exporters share tied embeddings through a Transpose node; the quantizer must still see
    the output projection as a constant-weight MatMul (it is most of a small model's bytes)."""
    from gptstore.manager import make_plugin_manager
    from gptstore.testing.models import build_causal_lm
    from gptstore_onnx import plugin

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(plugin, "onnx")
    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    build_causal_lm(staging / "m", tie_word_embeddings=True)
    store.commit(staging / "m", Manifest(id="tied", files=hash_files(staging / "m")))
    store.discard(staging)
    onnx = optimize(
        manager,
        store,
        "tied",
        "onnx-export",
        {"graph": "optimum", "fuse": False, "grouped_attention": False},
    )
    assert onnx.manifest.metrics_after["fused_operators"] == 0
    assert len(repeated_caches(onnx.path / "model.onnx")) == 4  # 2 layers x (key, value)
    assert operator_counts(onnx.path / "model.onnx")["RotaryEmbedding"] == 0
    assert "/lm_head/MatMul" not in constant_matmuls(onnx.path / "model.onnx")  # via Transpose
    quantized = optimize(manager, store, onnx.id, "onnx-quantize")
    assert constant_matmuls(quantized.path / "model.onnx") == []
    assert quantized.manifest.metrics_after["perplexity_change"] < 0.05
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(quantized)
    [result] = runner.generate([GenerationRequest(prompt="Hello", max_tokens=3)])
    assert result.finish_reason in ("length", "stop")
    runner.close()


def test_the_lean_graph_decodes_what_the_optimum_export_and_torch_do(exported, tiny_model):
    """graph = auto wrote the lean graph for this Llama model (a fraction of optimum's nodes);
    both graphs give torch's greedy text, batched with left padding and streamed, and the same
    log-probabilities."""
    manager, store, base, lean, _ = exported
    traced = optimize(manager, store, base.id, "onnx-export", {"graph": "optimum"})
    assert (
        lean.manifest.metrics_after["graph_nodes"] * 3
        < traced.manifest.metrics_after["graph_nodes"]
    )
    assert operator_counts(lean.path / "model.onnx")["GroupQueryAttention"] == 2
    runners = [
        manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(a) for a in (lean, traced)
    ]
    requests = [
        GenerationRequest(prompt=p, max_tokens=12)
        for p in (*PROMPTS, "A much longer prompt than the others, to pad them")
    ]
    texts = [[g.text for g in r.generate(requests)] for r in runners]
    assert texts[0] == texts[1]
    scores = [r.logprobs(["The quick brown fox jumps"])[0].logprobs[1:] for r in runners]
    assert max(abs(a - b) for a, b in zip(*scores, strict=True)) < 1e-4
    # optimum's graph concatenates past and new keys into new arrays: it cannot share a
    # buffer, and asking it to is an error that says which graph can.
    assert [r.shared_cache for r in runners] == [True, False]
    with pytest.raises(InvalidInput, match="not all written by GroupQueryAttention"):
        OrtBackend(OrtOptions(shared_cache=True)).load(traced)
    for runner in runners:
        runner.close()


def test_graph_lean_refuses_a_model_it_cannot_represent(tmp_path):
    import json

    from gptstore.manager import make_plugin_manager
    from gptstore.testing.models import build_causal_lm
    from gptstore_onnx import plugin

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(plugin, "onnx")
    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    folder = build_causal_lm(staging / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    store.commit(folder, Manifest(id="scaled", files=hash_files(folder)))
    store.discard(staging)
    with pytest.raises(InvalidInput, match="graph = lean: rope_scaling"):
        optimize(manager, store, "scaled", "onnx-export", {"graph": "lean"})
    # auto falls back to optimum's export, which handles it
    traced = optimize(manager, store, "scaled", "onnx-export")
    assert traced.manifest.metrics_after["max_logit_diff"] < 1e-3
    assert operator_counts(traced.path / "model.onnx").get("GroupQueryAttention", 0) == 0


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_grouped_attention_computes_what_transformers_does(mask_kind):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from gptstore_onnx.attention import grouped_attention, grouped_sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 3
    length = 1 if mask_kind == "none" else 5
    query = torch.randn(2, 6, length, 8)
    key, value = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = None
    if mask_kind != "none":
        allowed = torch.ones(2, 1, length, 7, dtype=torch.bool).tril(diagonal=2)
        allowed[0, :, :, :2] = False  # left padding of the first row
        mask = (
            allowed
            if mask_kind == "bool"
            else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        )
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = grouped_sdpa(sdpa_attention_forward)(module, query, key, value, mask, scaling=0.3)
    assert torch.allclose(got, expected, atol=1e-5)
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with grouped_attention():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


class TestOnnxBackendContract(BackendContract):
    @pytest.fixture
    def runner(self, exported):
        _manager, _store, _base, onnx, _ = exported
        runner = OrtBackend(OrtOptions()).load(onnx)
        yield runner
        runner.close()


class TestOnnxQuantizeContract(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        return OnnxQuantize(QuantizeOptions())

    @pytest.fixture
    def parent(self, exported):
        return exported[3]


class TestOnnxContinuousBatching(ContinuousBatchingContract):
    @pytest.fixture
    def runner(self, exported):
        _manager, _store, _base, onnx, _ = exported
        runner = OrtBackend(OrtOptions()).load(onnx)
        yield runner
        runner.close()


class TestOnnxArraysContinuousBatching(ContinuousBatchingContract):
    """Without the shared buffer the cache is new numpy arrays every step."""

    @pytest.fixture
    def runner(self, exported):
        _manager, _store, _base, onnx, _ = exported
        runner = OrtBackend(OrtOptions(shared_cache=False)).load(onnx)
        yield runner
        runner.close()


class TestOnnxIOBindingContinuousBatching(ContinuousBatchingContract):
    """With IOBinding the cache is OrtValues between steps; joins and leaves go through the
    host."""

    @pytest.fixture
    def runner(self, exported):
        _manager, _store, _base, onnx, _ = exported
        runner = OrtBackend(OrtOptions(io_binding=True, shared_cache=False)).load(onnx)
        yield runner
        runner.close()


def snapped_to_q4_1(source, dest):
    """A copy of the model in ``source`` whose projections hold Q4_1's values (blocks of 32
    along the input: ``m + k·d``) and whose output layer holds Q8_0's (``k·d``, |k| <= 127), as
    SmolLM2's GGUF does."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, dest)
    [weights_file] = dest.glob("*.safetensors")
    tensors = load_file(weights_file)
    for name, w in tensors.items():
        if w.ndim != 2 or "embed" in name:
            continue
        rows, cols = w.shape
        blocks = w.reshape(rows, cols // 32, 32).astype(np.float64)
        if "lm_head" in name:
            scale = np.abs(blocks).max(-1, keepdims=True) / 127
            snapped = np.rint(blocks / scale) * scale
        else:
            low = blocks.min(-1, keepdims=True)
            step = (blocks.max(-1, keepdims=True) - low) / 15
            snapped = low + np.rint((blocks - low) / step) * step
        tensors[name] = snapped.reshape(rows, cols).astype(np.float32)
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return dest


def test_offsets_hold_q4_1_weights_exactly(tmp_path, tiny_model):
    """offsets = true: 4-bit blocks plus float block offsets represent Q4_1 weights exactly
    (computed in fp32, the perplexity is the float model's), where integer zero points round
    every block again; the output layer goes to 8 bits; it serves."""
    from gptstore.manager import make_plugin_manager
    from gptstore_onnx import plugin

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(plugin, "onnx")
    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    snapped_to_q4_1(tiny_model, staging / "m")
    store.commit(staging / "m", Manifest(id="q41", files=hash_files(staging / "m")))
    store.discard(staging)
    onnx = optimize(manager, store, "q41", "onnx-export")
    exact, rounded = (
        optimize(manager, store, onnx.id, "onnx-quantize", {"bits": 4, "accuracy_level": 1, **form})
        for form in ({"offsets": True}, {"symmetric": False})
    )
    assert abs(exact.manifest.metrics_after["perplexity_change"]) < 1e-4
    assert rounded.manifest.metrics_after["perplexity_change"] > 10 * abs(
        exact.manifest.metrics_after["perplexity_change"]
    )
    operators = operator_counts(exact.path / "model.onnx")
    assert operators["MatMulNBits"] == 2 * 4 + 1  # 4 projections a layer, and the output
    offset_products = constant_matmuls(exact.path / "model.onnx")  # the float part left
    assert len(offset_products) == 2 * 4
    assert all(n.endswith("offset_matmul") for n in offset_products)
    runner = manager.get(ServingBackend, "onnx").factory(OrtOptions()).load(exact)
    [result] = runner.generate([GenerationRequest(prompt="Hello", max_tokens=4)])
    assert result.completion_tokens >= 1 or result.finish_reason == "stop"
    runner.close()
    with pytest.raises(GptstoreError, match="offsets = true is a form of 4-bit"):
        optimize(manager, store, onnx.id, "onnx-quantize", {"bits": 8, "offsets": True})
