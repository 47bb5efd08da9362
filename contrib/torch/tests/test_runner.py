"""The torch runner against transformers' own generate, on a real tiny model."""

from __future__ import annotations

import pytest

from gptstore.errors import InvalidInput
from gptstore.records import ServingBackend
from gptstore.testing.contracts import BackendContract, ContinuousBatchingContract
from gptstore.types import Artifact, ChatMessage, GenerationRequest, Manifest
from gptstore_torch import plugin
from gptstore_torch.runner import TorchBackend, TorchOptions

PROMPTS = ["Hello world", "The quick brown fox jumps over the", "a"]


@pytest.fixture(scope="module")
def runner(tiny_model):
    runner = TorchBackend(TorchOptions()).load(Artifact(tiny_model, Manifest(id="tiny")))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(
        tiny_model
    )


def hf_greedy(reference, prompt, max_new_tokens):
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_greedy_batch_matches_transformers_generate_per_prompt(runner, reference):
    results = runner.generate([GenerationRequest(prompt=p, max_tokens=12) for p in PROMPTS])
    assert [r.text for r in results] == [hf_greedy(reference, p, 12) for p in PROMPTS]
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.prompt_tokens == len(reference[1](prompt)["input_ids"])
        assert result.finish_reason in ("stop", "length")
        if result.finish_reason == "length":
            assert result.completion_tokens == 12


def test_sampling_is_reproducible_with_a_seed(runner):
    request = GenerationRequest(
        prompt="Once upon", max_tokens=10, temperature=1.2, top_p=0.9, top_k=50, seed=7
    )
    first, second = runner.generate([request, request])
    assert first.text == second.text
    others = {
        runner.generate(
            [GenerationRequest(prompt="Once upon", max_tokens=10, temperature=1.2, seed=s)]
        )[0].text
        for s in range(5)
    }
    assert len(others) > 1


def test_stop_sequences_cut_the_text(runner, reference):
    full = hf_greedy(reference, "Hello world", 12)
    stop = full[3:6]
    [result] = runner.generate(
        [GenerationRequest(prompt="Hello world", max_tokens=12, stop=(stop,))]
    )
    assert result.finish_reason == "stop"
    assert result.text == full[: full.find(stop)]


def test_streaming_yields_the_same_text(runner):
    request = GenerationRequest(prompt="The quick brown fox", max_tokens=12)
    chunks = list(runner.stream(request))
    assert "".join(c.text for c in chunks) == runner.generate([request])[0].text
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_logprobs_of_generated_and_given_text(runner, reference):
    import torch

    [result] = runner.generate([GenerationRequest(prompt="Hello", max_tokens=4, logprobs=3)])
    assert len(result.logprobs) >= 1
    first = result.logprobs[0]
    assert len(first.top) == 3
    assert first.logprob == pytest.approx(max(v for _t, v in first.top), abs=1e-5)  # greedy

    text = "The quick brown fox jumps over the lazy dog"
    [scored] = runner.logprobs([text])
    model, tokenizer = reference
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = (
            torch.log_softmax(model(ids).logits[0, :-1], -1)
            .gather(1, ids[0, 1:].unsqueeze(1))
            .squeeze(1)
        )
    assert scored.logprobs[0] is None
    assert scored.logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert "".join(scored.tokens) == text


def test_bad_requests_are_clear_errors(runner):
    with pytest.raises(InvalidInput, match="the prompt is empty"):
        runner.generate([GenerationRequest(prompt="", max_tokens=4)])
    with pytest.raises(InvalidInput, match="exceed the model's context of 2048 tokens"):
        runner.generate([GenerationRequest(prompt="hi", max_tokens=5000)])
    with pytest.raises(InvalidInput, match="top_p must lie in"):
        runner.generate([GenerationRequest(prompt="hi", top_p=0)])


def test_chat_prompt_and_health(runner):
    prompt = runner.chat_prompt([ChatMessage("user", "hi")])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert runner.health().ok
    assert runner.health().message == "torch cpu float32"


def test_the_backend_is_registered(plugin_manager):
    plugin_manager.register_plugin(plugin, "torch")
    try:
        assert plugin_manager.get(ServingBackend, "torch").factory is TorchBackend
    finally:
        plugin_manager.unregister_plugin("torch")


def test_a_stream_can_be_advanced_from_different_threads(runner):
    import threading

    stream = runner.stream(GenerationRequest(prompt="The quick brown fox", max_tokens=8))
    chunks = []

    def pull() -> None:
        chunks.append(next(stream, None))

    for _ in range(20):
        thread = threading.Thread(target=pull)  # a new thread each time, as a server may use
        thread.start()
        thread.join()
        if chunks[-1] is None or chunks[-1].finish_reason:
            break
    done = [c for c in chunks if c is not None]
    assert done[-1].finish_reason in ("stop", "length")


def test_a_peft_adapter_is_served_on_its_base_without_merging(tmp_path, tiny_model):
    import shutil

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from gptstore.artifacts import ArtifactStore, hash_files

    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "base")
    base = store.commit(staging / "base", Manifest(id="base-1", files=hash_files(staging / "base")))
    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(staging / "adapter", safe_serialization=True)
    adapter = store.commit(
        staging / "adapter",
        Manifest(id="lora-1", parent=base.id, files=hash_files(staging / "adapter")),
    )
    store.discard(staging)
    assert not (adapter.path / "model.safetensors").exists()  # only the adapter's weights

    request = GenerationRequest(prompt="Hello world", max_tokens=8)
    served = TorchBackend().load(adapter)
    plain = TorchBackend().load(base)
    [with_adapter] = served.generate([request])
    [without] = plain.generate([request])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), adapter.path
    )
    ids = served.tokenizer("Hello world", return_tensors="pt")
    out = reference.generate(**ids, max_new_tokens=8, do_sample=False)
    expected = served.tokenizer.decode(
        out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert with_adapter.text == expected
    assert with_adapter.text != without.text
    served.close()
    plain.close()


def _committed_adapter(tmp_path, tiny_model, peft_config, *, scale=1.0):
    """(base, adapter) artifacts of a store: the tiny model and a peft adapter made on it
    (prompt-learning embeddings scaled by ``scale``, so they steer the random model)."""
    import shutil

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gptstore.artifacts import ArtifactStore, hash_files

    store = ArtifactStore(tmp_path / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "base")
    base = store.commit(staging / "base", Manifest(id="base-1", files=hash_files(staging / "base")))
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), peft_config)
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.mul_(scale)
    model.save_pretrained(staging / "adapter", safe_serialization=True)
    adapter = store.commit(
        staging / "adapter",
        Manifest(id="adapter-1", parent=base.id, files=hash_files(staging / "adapter")),
    )
    store.discard(staging)
    return base, adapter


def _prompt_tuning(tiny_model):
    from peft import PromptTuningConfig

    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Python documentation:",
        tokenizer_name_or_path=str(tiny_model),
    )


def _p_tuning(_tiny_model):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=32)


@pytest.mark.parametrize("make_config", [_prompt_tuning, _p_tuning])
def test_a_prompt_tuning_adapter_is_served_as_peft_generates(tmp_path, tiny_model, make_config):
    """peft's forward prepends the virtual tokens on every call, cached decode steps included:
    the runner puts them in the cache once, and its greedy text (alone and in a left-padded
    batch) and log-probabilities are those of peft's generate and forward."""
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tiny_model)
    base, adapter = _committed_adapter(tmp_path, tiny_model, config, scale=3.0)
    served = TorchBackend().load(adapter)
    plain = TorchBackend().load(base)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), adapter.path
    ).eval()
    tokenizer = served.tokenizer
    expected = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with warnings.catch_warnings():  # peft ignores position ids, and says so
            warnings.simplefilter("ignore", UserWarning)
            out = reference.generate(**ids, max_new_tokens=10, do_sample=False)
        expected.append(
            tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    try:
        alone = [served.generate([GenerationRequest(prompt=p, max_tokens=10)])[0] for p in PROMPTS]
        batched = served.generate([GenerationRequest(prompt=p, max_tokens=10) for p in PROMPTS])
        without = plain.generate([GenerationRequest(prompt=p, max_tokens=10) for p in PROMPTS])
        assert [a.text for a in alone] == expected
        assert [b.text for b in batched] == expected
        assert [w.text for w in without] != expected
        streamed = served.stream(GenerationRequest(prompt=PROMPTS[1], max_tokens=10))
        assert "".join(c.text for c in streamed) == expected[1]
        virtual = config.num_virtual_tokens
        assert served.info().context_length == 2048 - virtual

        text = "The quick brown fox jumps over the lazy dog"
        [scored] = served.logprobs([text])
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = reference(input_ids=ids).logits[0, virtual:-1]
        picked = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
        assert scored.logprobs[1:] == pytest.approx(picked.tolist(), abs=1e-4)
        assert "".join(scored.tokens) == text
    finally:
        served.close()
        plain.close()


def test_a_prefix_tuning_adapter_is_refused_clearly(tmp_path, tiny_model):
    from peft import PrefixTuningConfig

    from gptstore.errors import RefusedModel

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    _base, adapter = _committed_adapter(tmp_path, tiny_model, config)
    with pytest.raises(RefusedModel, match="a PREFIX_TUNING adapter; the torch backend serves"):
        TorchBackend().load(adapter)


class TestTorchBackendContract(BackendContract):
    @pytest.fixture
    def runner(self, tiny_model):
        runner = TorchBackend(TorchOptions()).load(Artifact(tiny_model, Manifest(id="tiny")))
        yield runner
        runner.close()


def test_eval_measures_on_this_host_and_records_it(tmp_path, tiny_model):
    """`gptstore eval` as a user runs it: the figures land in the manifest as measured here,
    a second run replaces them, and a text longer than the context is scored in pieces."""
    import json

    from gptstore.artifacts import ArtifactStore, hash_files
    from gptstore.testing import add_artifact, run_cli

    home = tmp_path / "home"
    add_artifact(home / "artifacts", tiny_model, "tiny")
    store = ArtifactStore(home / "artifacts")
    data = tmp_path / "heldout.jsonl"
    long_text = " ".join(f"word{i}" for i in range(3000))  # past the 2048-token context
    data.write_text(
        json.dumps({"text": long_text})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hello there"}]})
        + "\n"
    )
    for _ in range(2):
        result = run_cli(
            "--home", str(home), "eval", "tiny", "--backend", "torch", "--data", str(data),
            "--max-tokens", "8", "--json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    measured = {m["name"]: m for m in json.loads(result.stdout)}
    assert set(measured) == {
        "perplexity", "decode_tokens_per_s", "time_to_first_token_s", "resident_bytes"
    }  # fmt: skip
    assert 1 < measured["perplexity"]["value"] < 10_000
    assert measured["perplexity"]["data"].startswith(f"{data}@")
    assert measured["decode_tokens_per_s"]["value"] > 0
    assert measured["resident_bytes"]["value"] > 0
    assert "cores" in measured["decode_tokens_per_s"]["host"]
    manifest = store.get("tiny").manifest
    assert len(manifest.measured) == 4  # the second run replaced the first
    assert manifest.files == hash_files(store.get("tiny").path)  # the files are untouched


class TestTorchContinuousBatching(ContinuousBatchingContract):
    @pytest.fixture
    def runner(self, runner):  # the module's loaded runner
        return runner


class TestPromptTuningContinuousBatching(ContinuousBatchingContract):
    """A prompt-tuning adapter's virtual tokens stay at the front of every row's cache as rows
    join (padding goes after them) and leave (trimmed padding is cut after them)."""

    @pytest.fixture
    def runner(self, prompt_tuned):
        return prompt_tuned


@pytest.fixture(scope="module")
def prompt_tuned(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("prompt-tuning")
    _base, adapter = _committed_adapter(folder, tiny_model, _prompt_tuning(tiny_model), scale=3.0)
    runner = TorchBackend().load(adapter)
    yield runner
    runner.close()
