"""Tiny, real Hugging Face format causal LMs built locally (no hub): random weights from a config,
a byte-level BPE tokenizer trained with ``tokenizers`` on text every Python install has
(``pydoc_data.topics``), saved as safetensors.

torch, transformers and tokenizers are imported inside the functions: importing this module costs
nothing, and only core's ``test`` extra depends on them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from gptstore.modelfiles import readme_text

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(pydoc_data.topics.topics.values(), trainer)
    return tokenizer.to_str()


def tokenizer(vocab_size: int = 2048) -> Any:
    """A PreTrainedTokenizerFast with a ChatML template (trained once per process)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # Without this, generate() receives token_type_ids and fails.
        model_input_names=["input_ids", "attention_mask"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_causal_lm(
    dest: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 2048,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    readme: dict[str, Any] | None = None,
    description: str = "A tiny Llama-architecture model with random weights, built for tests.",
) -> Path:
    """Build a LlamaForCausalLM with random weights into ``dest`` (created) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or hidden_size * 4,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tok.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    if readme is not None:
        (dest / "README.md").write_text(readme_text(readme, description), encoding="utf-8")
    return dest


def build_lora_adapter(
    dest: Path,
    base: Path,
    *,
    seed: int = 0,
    r: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj"),
    use_dora: bool = False,
) -> Path:
    """A PEFT LoRA adapter of the model in ``base``, saved (safetensors) into ``dest``, with
    random weights rather than peft's zero start, so each seed changes the model's answers in its
    own way (needs peft)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(target_modules),
        init_lora_weights=False,
        use_dora=use_dora,
    )
    get_peft_model(model, config).save_pretrained(dest, safe_serialization=True)
    return dest
