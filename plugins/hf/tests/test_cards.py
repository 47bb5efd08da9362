"""How hub listings become cards. The payloads have the shape of the hub's /api/models answer
with expand=cardData,safetensors,config,... as huggingface_hub's ModelInfo parses it (written for
these tests: the hub is not reachable from here)."""

from __future__ import annotations

from datetime import UTC, datetime

from huggingface_hub import ModelInfo

from gptstore_hf.cards import model_info_to_card

SMOLLM2 = {
    "_id": "672f8ba1d4e5e0e9a7f1c0a2",
    "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "sha": "12fd25f77366fa6b3b4b768ec3050bf629380bac",
    "lastModified": "2025-02-06T10:34:36.000Z",
    "createdAt": "2024-10-31T13:41:10.000Z",
    "downloads": 412345,
    "likes": 187,
    "gated": False,
    "library_name": "transformers",
    "pipeline_tag": "text-generation",
    "tags": [
        "transformers",
        "safetensors",
        "llama",
        "text-generation",
        "conversational",
        "en",
        "base_model:HuggingFaceTB/SmolLM2-135M",
        "license:apache-2.0",
        "region:us",
    ],
    "config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "safetensors": {"parameters": {"BF16": 134515008}, "total": 134515008},
    "cardData": {
        "library_name": "transformers",
        "license": "apache-2.0",
        "language": ["en"],
        "pipeline_tag": "text-generation",
        "tags": ["safetensors", "onnx", "transformers.js"],
        "base_model": ["HuggingFaceTB/SmolLM2-135M"],
        "model-index": [
            {
                "name": "SmolLM2-135M-Instruct",
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": "HellaSwag", "type": "hellaswag"},
                        "metrics": [{"type": "acc_norm", "value": 42.1}],
                    },
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": "IFEval", "type": "ifeval"},
                        "metrics": [
                            {"type": "inst_level_strict_acc", "value": 29.9},
                            {"type": "prompt_level_strict_acc", "value": 21.0},
                        ],
                    },
                ],
            }
        ],
    },
}

BARE = {
    "id": "someone/no-card",
    "sha": "0" * 40,
    "downloads": 3,
    "likes": 0,
    "pipeline_tag": "fill-mask",
    "tags": ["license:mit", "bert"],
}


def test_a_full_listing_becomes_a_full_card():
    card = model_info_to_card(ModelInfo(**SMOLLM2))
    assert card.uid == "hf:HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.revision == "12fd25f77366fa6b3b4b768ec3050bf629380bac"
    assert (card.parameters, card.dtype, card.architecture) == (
        134515008,
        "bfloat16",
        "LlamaForCausalLM",
    )
    assert (card.tasks, card.languages, card.license) == (
        ("text-generation",),
        ("en",),
        "apache-2.0",
    )
    assert card.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {m.name: (m.value, m.kind, m.origin) for m in card.metrics} == {
        "hellaswag": (42.1, "acc_norm", "reported"),
        "ifeval": (29.9, "inst_level_strict_acc", "reported"),
        "ifeval/prompt_level_strict_acc": (21.0, "prompt_level_strict_acc", "reported"),
    }
    assert (card.popularity, card.likes) == (412345, 187)
    assert card.updated_at == datetime(2025, 2, 6, 10, 34, 36, tzinfo=UTC)
    assert "license:apache-2.0" not in card.tags
    assert "conversational" in card.tags
    assert card.location == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_bare_listing_still_becomes_a_card():
    card = model_info_to_card(ModelInfo(**BARE), "https://hub.example")
    assert (card.parameters, card.architecture, card.metrics) == (None, None, ())
    assert card.license == "mit"  # from the license: tag when the card has none
    assert card.location == "https://hub.example/someone/no-card"
