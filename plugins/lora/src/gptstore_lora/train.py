"""LoRA fine-tuning with peft: the method (which projections get low-rank adapters, and DoRA)
on gptstore's shared training (``train_adapter``: packed blocks of the user's text, a plain AdamW
loop with warmup and cosine decay, held-out perplexity before and after), saved as an adapter
or merged into the weights, as safetensors. torch, transformers and peft are imported when a run
starts."""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    OptimizationContext,
    TrainingOptions,
    in_range,
    str_tuple,
    train_adapter,
)

#: Every attention and MLP projection of Llama-like models (SmolLM2, Qwen, Mistral...).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@frozen(kw_only=True)
class LoraOptions(TrainingOptions):
    """Options of the ``lora`` strategy (see the package README); the training ones are
    :class:`TrainingOptions`'."""

    r: int = field(default=8, validator=in_range(1, 1024))
    alpha: float = field(default=16.0, validator=in_range(0, 1e6, open_low=True))
    dropout: float = field(default=0.05, validator=in_range(0, 1))
    target_modules: tuple[str, ...] = field(default=PROJECTIONS, converter=str_tuple)
    learning_rate: float = field(default=1e-3, validator=in_range(0, 1, open_low=True))
    merge: bool = False
    use_dora: bool = False


class Lora:
    """The ``lora`` strategy."""

    def __init__(self, options: LoraOptions | None) -> None:
        self.options = options or LoraOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options

        def wrap(model: Any, _tokenizer: Any) -> Any:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=options.r,
                lora_alpha=options.alpha,
                lora_dropout=options.dropout,
                target_modules=list(options.target_modules),
                use_dora=options.use_dora,
                task_type="CAUSAL_LM",
            )
            return get_peft_model(model, config)

        return train_adapter(
            artifact,
            context,
            options,
            strategy="lora",
            learning_rate=options.learning_rate,
            wrap=wrap,
            merge=options.merge,
        )
