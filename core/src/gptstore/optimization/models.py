"""What strategies that change weights share: loading an HF-format artifact safely, rendering
conversations with its chat template, and packing text into token blocks.

transformers is imported when these run (it is the strategies' dependency, not the core's), so
values from it are typed ``Any`` here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from gptstore.errors import InvalidInput
from gptstore.modelfiles import weight_files
from gptstore.types import Artifact, ChatMessage


def load_causal_lm(artifact: Artifact, strategy: str) -> tuple[Any, Any]:
    """(model in float32, tokenizer) of a Hugging Face format artifact: safetensors only, never
    remote code, never the hub. InvalidInput naming ``strategy`` for any other artifact."""
    if artifact.manifest.kind != "hf" or not weight_files(artifact.path):
        raise InvalidInput(
            "artifact",
            [f"{artifact.id} is {artifact.manifest.kind}; {strategy} takes a Hugging Face model"],
        )
    transformers: Any = importlib.import_module("transformers")
    torch: Any = importlib.import_module("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        artifact.path, trust_remote_code=False, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        artifact.path,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    return model, tokenizer


def chat_renderer(tokenizer: Any) -> Callable[[tuple[ChatMessage, ...]], str]:
    """Renders a conversation with the tokenizer's chat template (for ``Dataset.texts``)."""

    def render(messages: tuple[ChatMessage, ...]) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return str(tokenizer.apply_chat_template(chat, tokenize=False))

    return render


def packed_ids(
    tokenizer: Any, texts: Sequence[str], seq_len: int, *, max_tokens: int | None = None
) -> list[list[int]]:
    """Texts tokenized, joined with end-of-sequence tokens and cut into blocks of ``seq_len``
    (packing: nothing is padding), stopping at ``max_tokens`` when given."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
