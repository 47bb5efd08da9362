"""Prompt tuning with peft: a few virtual tokens, initialised from the embeddings of a text,
trained in front of a frozen model on packed blocks of the user's text; held-out perplexity
before and after, and an adapter saved as safetensors (the ``torch`` backend serves it).

The data handling, training loop, schedule, measurements and artifact layout are the ones
gptstore-lora uses too (``train_adapter``, through ``gptstore.plugin``); this module is the
method. torch, transformers and peft are imported when a run starts.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    FieldProblem,
    InvalidInput,
    OptimizationContext,
    TrainingOptions,
    in_range,
    train_adapter,
)

STRATEGY = "prompt-tuning"
#: What the virtual tokens start as (repeated or cut to ``num_virtual_tokens`` tokens).
DEFAULT_INIT_TEXT = "Continue the following text in the same style, on the same subject:"


def _not_blank(_instance: Any, attribute: Any, value: str) -> None:
    if not value.strip():
        raise FieldProblem(attribute.name, f"{attribute.name} must not be blank")


@frozen(kw_only=True)
class PromptTuningOptions(TrainingOptions):
    """Options of the ``prompt-tuning`` strategy (see the package README); the training ones
    are :class:`TrainingOptions`'."""

    num_virtual_tokens: int = field(default=20, validator=in_range(1, 1024))
    prompt_tuning_init_text: str = field(default=DEFAULT_INIT_TEXT, validator=_not_blank)
    learning_rate: float = field(default=3e-2, validator=in_range(0, 10, open_low=True))


class PromptTuning:
    """The ``prompt-tuning`` strategy."""

    def __init__(self, options: PromptTuningOptions | None) -> None:
        self.options = options or PromptTuningOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options

        def wrap(model: Any, _tokenizer: Any) -> Any:
            from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

            config = PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=options.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=options.prompt_tuning_init_text,
                # The base artifact's own tokenizer, from its folder: never the hub.
                tokenizer_name_or_path=str(artifact.path),
                tokenizer_kwargs={"local_files_only": True},
            )
            return get_peft_model(model, config)

        return train_adapter(
            artifact,
            context,
            options,
            strategy=STRATEGY,
            learning_rate=options.learning_rate,
            wrap=wrap,
            check=lambda model, tokenizer: _check_fits(model, tokenizer, options),
        )


def _check_fits(model: Any, tokenizer: Any, options: PromptTuningOptions) -> None:
    """InvalidInput when the virtual tokens and a block do not fit the model's context, or the
    initial text has no tokens."""
    problems = []
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if context and options.num_virtual_tokens + options.seq_len > context:
        problems.append(
            f"num_virtual_tokens {options.num_virtual_tokens} plus seq_len {options.seq_len} "
            f"exceed the model's context of {context} tokens"
        )
    if not tokenizer(options.prompt_tuning_init_text)["input_ids"]:
        problems.append("prompt_tuning_init_text has no tokens for this model's tokenizer")
    if problems:
        raise InvalidInput("options", problems)
