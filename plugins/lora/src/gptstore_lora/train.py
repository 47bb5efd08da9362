"""LoRA fine-tuning with peft: packed blocks of the user's text, a plain AdamW loop with warmup
and cosine decay, held-out perplexity before and after, and an adapter or merged model saved as
safetensors. torch, transformers and peft are imported when a run starts."""

from __future__ import annotations

import json
import time

from attrs import field, frozen

from gptstore.plugin import (
    LOG_FILE,
    Artifact,
    OptimizationContext,
    at_least,
    block_perplexity,
    copy_readme,
    derive_manifest,
    heldout_split,
    in_range,
    load_causal_lm,
    step_count,
    str_tuple,
    token_blocks,
    train_steps,
    training_metrics,
    training_texts,
    unstructure,
)

#: Every attention and MLP projection of Llama-like models (SmolLM2, Qwen, Mistral...).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@frozen(kw_only=True)
class LoraOptions:
    """Options of the ``lora`` strategy (see the package README)."""

    r: int = field(default=8, validator=in_range(1, 1024))
    alpha: float = field(default=16.0, validator=in_range(0, 1e6, open_low=True))
    dropout: float = field(default=0.05, validator=in_range(0, 1))
    target_modules: tuple[str, ...] = field(default=PROJECTIONS, converter=str_tuple)
    learning_rate: float = field(default=1e-3, validator=in_range(0, 1, open_low=True))
    max_steps: int = field(default=100, validator=in_range(1, 10**7))
    epochs: float | None = field(default=None, validator=in_range(0, 1e4, open_low=True))
    batch_size: int = field(default=4, validator=in_range(1, 4096))
    seq_len: int = field(default=256, validator=in_range(8, 1 << 20))
    warmup_steps: int = field(default=10, validator=at_least(0))
    seed: int = 0
    eval_fraction: float = field(default=0.1, validator=in_range(0, 0.9))
    merge: bool = False
    use_dora: bool = False
    threads: int | None = field(default=None, validator=at_least(1))


class Lora:
    """The ``lora`` strategy."""

    def __init__(self, options: LoraOptions | None) -> None:
        self.options = options or LoraOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        import torch
        from peft import LoraConfig, get_peft_model

        options = self.options
        if options.threads:
            torch.set_num_threads(options.threads)
        torch.manual_seed(options.seed)
        started = time.perf_counter()
        context.progress(0.0, "loading the model")
        model, tokenizer = load_causal_lm(artifact, "lora")
        blocks = token_blocks(tokenizer, training_texts(context, tokenizer), options.seq_len)
        heldout, train = heldout_split(blocks, options.eval_fraction, options.seed)
        held = len(heldout)
        context.check_cancelled()
        context.progress(0.02, "measuring held-out perplexity before training")
        before = block_perplexity(model, heldout, options.batch_size) if held else None

        model = get_peft_model(
            model,
            LoraConfig(
                r=options.r,
                lora_alpha=options.alpha,
                lora_dropout=options.dropout,
                target_modules=list(options.target_modules),
                use_dora=options.use_dora,
                task_type="CAUSAL_LM",
            ),
        )
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
        metrics_after = training_metrics(
            model,
            losses,
            started=started,
            train_blocks=len(train),
            heldout_blocks=held,
            heldout_perplexity=after,
        )
        out = context.output_dir
        if options.merge:
            context.progress(0.95, "merging the adapter into the weights")
            model.merge_and_unload().save_pretrained(out, safe_serialization=True)
            kind = "hf"
        else:
            model.save_pretrained(out, safe_serialization=True)
            kind = "adapter"
        tokenizer.save_pretrained(out)
        (out / LOG_FILE).write_text(json.dumps({"loss": losses, "steps": len(losses)}, indent=1))
        copy_readme(artifact.path, out)
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            out,
            strategy="lora",
            options=unstructure(options),
            kind=kind,
            data_digest=context.data.digest or "default:pydoc_data.topics",
            metrics_before={"heldout_perplexity": before} if before is not None else {},
            metrics_after=metrics_after,
        )
        return Artifact(out, manifest)
