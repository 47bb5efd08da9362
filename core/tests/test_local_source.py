"""The built-in local source over real model folders (tiny Llama built with torch)."""

from __future__ import annotations

import json
import shutil

import pytest

from gptstore.builtins.local import LocalOptions, LocalSource, read_card
from gptstore.errors import GptstoreError, InvalidInput, NotFound, RefusedModel
from gptstore.modelfiles import count_parameters, read_safetensors_header
from gptstore.protocols import Refusal
from gptstore.testing.models import readme_text
from gptstore.types import ModelCard, SearchQuery

README_META = {
    "license": "apache-2.0",
    "language": ["en", "FR"],
    "pipeline_tag": "text-generation",
    "tags": ["chat", "tiny"],
    "base_model": "example/base",
    "model-index": [
        {
            "name": "x",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": "MMLU", "type": "cais/mmlu"},
                    "metrics": [
                        {"type": "acc", "value": 41.5},
                        {"type": "acc_norm", "value": 43.0},
                    ],
                },
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": "WikiText", "type": "wikitext"},
                    "metrics": [{"type": "perplexity", "value": 23.4}],
                },
            ],
        }
    ],
}


@pytest.fixture
def models(tmp_path, tiny_model):
    root = tmp_path / "models"
    shutil.copytree(tiny_model, root / "tiny")
    (root / "tiny" / "README.md").write_text(
        readme_text(README_META, "A tiny chat model.\n\nMore.")
    )
    return root


def test_parameter_count_from_headers_matches_torch(tiny_model):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(tiny_model / "model.safetensors")
    expected = sum(t.numel() for t in tensors.values())
    count, dtype = count_parameters([tiny_model / "model.safetensors"])
    assert count == expected
    assert dtype == "float32"
    assert all(v.dtype == torch.float32 for v in tensors.values())


def test_card_reads_config_headers_and_front_matter(models):
    card = read_card(models / "tiny", "tiny")
    assert card.architecture == "LlamaForCausalLM"
    assert card.context_length == 2048
    assert card.tasks == ("text-generation",)
    assert card.languages == ("en", "fr")
    assert card.license == "apache-2.0"
    assert card.base_model == "example/base"
    assert card.description == "A tiny chat model."
    assert {m.name: (m.value, m.kind, m.origin) for m in card.metrics} == {
        "mmlu": (41.5, "acc", "reported"),
        "mmlu/acc_norm": (43.0, "acc_norm", "reported"),
        "wikitext": (23.4, "perplexity", "reported"),
    }
    # perplexity is lower-is-better: not part of quality
    assert card.quality == pytest.approx((0.415 + 0.43) / 2)
    assert card.size_bytes > card.parameters * 4


def test_pickle_only_folder_is_refused_without_reading_it(models):
    legacy = models / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(
        RefusedModel,
        match=r"only pickle weights \(pytorch_model\.bin\); gptstore loads safetensors only",
    ):
        read_card(legacy, "legacy")
    source = LocalSource(LocalOptions(paths=(str(models),)))
    items = list(source.search(SearchQuery()))
    assert [i.model_id for i in items if isinstance(i, ModelCard)] == ["tiny"]
    [refusal] = [i for i in items if isinstance(i, Refusal)]
    assert refusal.model_id == "legacy"
    assert "pickle" in refusal.reason


def test_broken_files_are_clear_errors(models, tmp_path):
    bad = models / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]")
    with pytest.raises(InvalidInput, match=r"config\.json: not valid JSON"):
        read_card(bad, "bad")
    with pytest.raises(InvalidInput, match="not a JSON object"):
        read_safetensors_header(bad / "model.safetensors")


def test_sharded_weights_follow_the_index(models):
    folder = models / "tiny"
    header = read_safetensors_header(folder / "model.safetensors")
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    shutil.copy(folder / "model.safetensors", folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors").unlink()
    names = [n for n in header if n != "__metadata__"]
    weight_map = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one_file = count_parameters([folder / "model-00001-of-00002.safetensors"])[0]
    assert read_card(folder, "tiny").parameters == 2 * one_file


def test_search_filters_by_text_and_task(models):
    source = LocalSource(LocalOptions(paths=(str(models),)))
    assert [c.model_id for c in source.search(SearchQuery(text="chat"))] == ["tiny"]
    assert list(source.search(SearchQuery(text="vision"))) == []
    assert list(source.search(SearchQuery(task="fill-mask"))) == []


def test_fetch_copies_model_files_and_refuses_escapes(models, tmp_path):
    source = LocalSource(LocalOptions(paths=(str(models),)))
    card = read_card(models / "tiny", "tiny")
    folder = source.fetch("tiny", card.revision, tmp_path / "dest")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    outside = tmp_path / "outside"
    shutil.copytree(models / "tiny", outside)
    for escape in ("../outside", str(outside), "tiny/../../outside"):
        with pytest.raises(NotFound):
            source.fetch(escape, None, tmp_path / "dest2")
    with pytest.raises(GptstoreError, match="changed since it was synced"):
        source.fetch("tiny", "0000", tmp_path / "dest3")


def test_status_says_what_to_do():
    status = LocalSource(LocalOptions()).status()
    assert not status.online
    assert "gptstore init --local-path" in status.message


def test_index_shard_names_cannot_leave_the_folder(models, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"not for the store")
    folder = models / "tiny"
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../secret.safetensors"}})
    )
    with pytest.raises(InvalidInput, match=r"is not a \*\.safetensors file name in this folder"):
        read_card(folder, "tiny")


def test_fetch_refuses_files_linked_from_outside_the_folder(models, tmp_path):
    (tmp_path / "elsewhere.txt").write_text("private")
    (models / "tiny" / "notes.txt").symlink_to(tmp_path / "elsewhere.txt")
    source = LocalSource(LocalOptions(paths=(str(models),)))
    with pytest.raises(RefusedModel, match=r"notes\.txt link\(s\) outside"):
        source.fetch("tiny", None, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_configured_folder_that_is_itself_a_model(models, tmp_path):
    source = LocalSource(LocalOptions(paths=str(models / "tiny")))  # one path, as a string
    [card] = list(source.search(SearchQuery()))
    assert card.model_id == "tiny"
    assert (source.fetch("tiny", card.revision, tmp_path / "dest") / "config.json").is_file()
    with pytest.raises(GptstoreError, match="already exists"):
        source.fetch("tiny", card.revision, tmp_path / "dest")


def test_malformed_metadata_is_refused_alone(models):
    broken = models / "broken"
    shutil.copytree(models / "tiny", broken)
    (broken / "README.md").write_text(
        readme_text({"model-index": ["just a string"], "license": ["mit", "apache-2.0"]}, "x")
    )
    assert read_card(broken, "broken").license == "mit"
    (broken / "model.safetensors").write_bytes(b'\x0f\x00\x00\x00\x00\x00\x00\x00{"w": "oops"}')
    source = LocalSource(LocalOptions(paths=(str(models),)))
    items = {i.model_id: i for i in source.search(SearchQuery())}
    assert isinstance(items["tiny"], ModelCard)
    assert isinstance(items["broken"], Refusal)
    assert "no valid shape" in items["broken"].reason
