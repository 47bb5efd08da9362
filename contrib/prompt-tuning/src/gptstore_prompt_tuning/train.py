"""Prompt tuning with peft: a few virtual tokens, initialised from the embeddings of a text,
trained in front of a frozen model on packed blocks of the user's text; held-out perplexity
before and after, and an adapter saved as safetensors (the ``torch`` backend serves it).

The data handling, training loop, schedule, measurements and artifact layout are the ones
gptstore-lora uses too (``gptstore.optimization.training``, through ``gptstore.plugin``). torch,
transformers and peft are imported when a run starts.
"""

from __future__ import annotations

import json
import time
from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    LOG_FILE,
    Artifact,
    FieldProblem,
    InvalidInput,
    OptimizationContext,
    at_least,
    block_perplexity,
    copy_readme,
    derive_manifest,
    heldout_split,
    in_range,
    load_causal_lm,
    step_count,
    token_blocks,
    train_steps,
    training_metrics,
    training_texts,
    unstructure,
)

STRATEGY = "prompt-tuning"
#: What the virtual tokens start as (repeated or cut to ``num_virtual_tokens`` tokens).
DEFAULT_INIT_TEXT = "Continue the following text in the same style, on the same subject:"


def _not_blank(_instance: Any, attribute: Any, value: str) -> None:
    if not value.strip():
        raise FieldProblem(attribute.name, f"{attribute.name} must not be blank")


@frozen(kw_only=True)
class PromptTuningOptions:
    """Options of the ``prompt-tuning`` strategy (see the package README)."""

    num_virtual_tokens: int = field(default=20, validator=in_range(1, 1024))
    prompt_tuning_init_text: str = field(default=DEFAULT_INIT_TEXT, validator=_not_blank)
    learning_rate: float = field(default=3e-2, validator=in_range(0, 10, open_low=True))
    max_steps: int = field(default=100, validator=in_range(1, 10**7))
    epochs: float | None = field(default=None, validator=in_range(0, 1e4, open_low=True))
    batch_size: int = field(default=4, validator=in_range(1, 4096))
    seq_len: int = field(default=256, validator=in_range(8, 1 << 20))
    warmup_steps: int = field(default=10, validator=at_least(0))
    seed: int = 0
    eval_fraction: float = field(default=0.1, validator=in_range(0, 0.9))
    threads: int | None = field(default=None, validator=at_least(1))


class PromptTuning:
    """The ``prompt-tuning`` strategy."""

    def __init__(self, options: PromptTuningOptions | None) -> None:
        self.options = options or PromptTuningOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        import torch
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        options = self.options
        if options.threads:
            torch.set_num_threads(options.threads)
        torch.manual_seed(options.seed)
        started = time.perf_counter()
        context.progress(0.0, "loading the model")
        model, tokenizer = load_causal_lm(artifact, STRATEGY)
        _check_fits(model, tokenizer, options)
        blocks = token_blocks(tokenizer, training_texts(context, tokenizer), options.seq_len)
        heldout, train = heldout_split(blocks, options.eval_fraction, options.seed)
        context.check_cancelled()
        context.progress(0.02, "measuring held-out perplexity before training")
        held = len(heldout)
        before = block_perplexity(model, heldout, options.batch_size) if held else None

        model = get_peft_model(
            model,
            PromptTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=options.num_virtual_tokens,
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=options.prompt_tuning_init_text,
                # The base artifact's own tokenizer, from its folder: never the hub.
                tokenizer_name_or_path=str(artifact.path),
                tokenizer_kwargs={"local_files_only": True},
            ),
        )
        context.check_cancelled()
        losses = train_steps(
            model,
            train,
            steps=step_count(options.max_steps, options.epochs, len(train), options.batch_size),
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            warmup_steps=options.warmup_steps,
            seed=options.seed,
            context=context,
        )
        context.progress(0.92, "measuring held-out perplexity after training")
        after = block_perplexity(model, heldout, options.batch_size) if held else None
        out = context.output_dir
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        metrics_after = training_metrics(
            model,
            losses,
            started=started,
            train_blocks=len(train),
            heldout_blocks=held,
            heldout_perplexity=after,
        )
        (out / LOG_FILE).write_text(json.dumps({"loss": losses, "steps": len(losses)}, indent=1))
        copy_readme(artifact.path, out)
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            out,
            strategy=STRATEGY,
            options=unstructure(options),
            kind="adapter",
            data_digest=context.data.digest or "default:pydoc_data.topics",
            metrics_before={"heldout_perplexity": before} if before is not None else {},
            metrics_after=metrics_after,
        )
        return Artifact(out, manifest)


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
