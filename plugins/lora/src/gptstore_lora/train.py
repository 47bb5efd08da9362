"""LoRA fine-tuning with peft: packed blocks of the user's text, a plain AdamW loop with warmup
and cosine decay, held-out perplexity before and after, and an adapter or merged model saved as
safetensors. torch, transformers and peft are imported when a run starts."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    InvalidInput,
    OptimizationContext,
    at_least,
    chat_renderer,
    default_dataset,
    derive_manifest,
    in_range,
    load_causal_lm,
    packed_ids,
    split,
    str_tuple,
    unstructure,
)

#: Every attention and MLP projection of Llama-like models (SmolLM2, Qwen, Mistral...).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOG_FILE = "training_log.json"


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


def _blocks(tokenizer: Any, texts: list[str], seq_len: int) -> Any:
    """The texts packed into ``seq_len`` blocks, as one tensor; at least two (one held out)."""
    import torch

    blocks = packed_ids(tokenizer, texts, seq_len)
    if len(blocks) < 2:
        raise InvalidInput(
            "data",
            [
                f"the data makes {len(blocks)} block(s) of seq_len {seq_len}; give more text "
                "or a smaller seq_len (at least 2 blocks: one is held out)"
            ],
        )
    return torch.tensor(blocks)


def _perplexity(model: Any, blocks: Any, batch_size: int) -> float:
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.numel() - len(batch)  # each row predicts all but its first token
            total += float(loss) * tokens
            count += tokens
    return math.exp(total / count)


def _schedule(step: int, options: LoraOptions, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the learning rate."""
    if step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, total - options.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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
        # Without data: the built-in corpus's training part (its held-out tenth is never seen).
        texts = context.data.texts(chat_renderer(tokenizer))
        texts = texts or split(default_dataset(), 0.1)[0].texts()
        blocks = _blocks(tokenizer, texts, options.seq_len)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(options.seed))
        held = max(1, round(len(blocks) * options.eval_fraction)) if options.eval_fraction else 0
        heldout, train = blocks[order[:held]], blocks[order[held:]]
        context.check_cancelled()
        context.progress(0.02, "measuring held-out perplexity before training")
        before = _perplexity(model, heldout, options.batch_size) if held else None

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
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total_params = sum(p.numel() for p in model.parameters())
        steps = options.max_steps
        if options.epochs is not None:
            steps = max(1, math.ceil(options.epochs * len(train) / options.batch_size))
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=options.learning_rate
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _schedule(step, options, steps)
        )
        losses: list[float] = []
        model.train()
        train_started = time.perf_counter()
        generator = torch.Generator().manual_seed(options.seed)
        position = len(train)  # start with a fresh shuffle
        for step in range(steps):
            if position + options.batch_size > len(train):
                train = train[torch.randperm(len(train), generator=generator)]
                position = 0
            batch = train[position : position + options.batch_size]
            position += options.batch_size
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            context.check_cancelled()
            spent = time.perf_counter() - train_started
            eta = spent / (step + 1) * (steps - step - 1)
            context.progress(
                0.05 + 0.85 * (step + 1) / steps,
                f"step {step + 1}/{steps} loss {losses[-1]:.3f} eta {eta:.0f}s",
            )
        context.progress(0.92, "measuring held-out perplexity after training")
        after = _perplexity(model, heldout, options.batch_size) if held else None
        out = context.output_dir
        if options.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(out, safe_serialization=True)
            kind = "hf"
        else:
            model.save_pretrained(out, safe_serialization=True)
            kind = "adapter"
        tokenizer.save_pretrained(out)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (out / LOG_FILE).write_text(json.dumps({"loss": losses, "steps": steps}, indent=1))
        _copy_readme(artifact.path, out)
        context.progress(1.0, "done")
        metrics_after: dict[str, float] = {
            "trainable_parameters": float(trainable),
            "trainable_share": trainable / total_params,
            "steps": float(steps),
            "final_loss": losses[-1],
            "wall_time_s": wall,
            "peak_rss_bytes": float(peak),
            "train_blocks": float(len(train)),
            "heldout_blocks": float(held),
        }
        if after is not None:
            metrics_after["heldout_perplexity"] = after
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


def _copy_readme(source: Path, target: Path) -> None:
    """The base's model card goes with it (license, languages, tags)."""
    readme = source / "README.md"
    if readme.is_file() and not (target / "README.md").exists():
        (target / "README.md").write_bytes(readme.read_bytes())
