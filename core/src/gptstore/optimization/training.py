"""What strategies that train with peft share: the data packed into token blocks (the user's,
else the built-in corpus's training part), a seeded held-out split, perplexity on blocks, a plain
AdamW loop with warmup and cosine decay that reports progress (loss and ETA) and honours
cancellation, and the figures a training step records; :func:`train_adapter` does all of it
around a strategy's own method (LoRA, prompt tuning...), which only wraps the model.
``gptstore-lora`` and ``gptstore-prompt-tuning`` use them through :mod:`gptstore.plugin`.

torch is imported when these run (the strategies' dependency, not the core's).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import field, frozen

from gptstore.artifacts import derive_manifest
from gptstore.converter import at_least, in_range, unstructure
from gptstore.errors import InvalidInput
from gptstore.optimization.data import DEFAULT_CORPUS, default_dataset, split
from gptstore.optimization.models import chat_renderer, load_causal_lm, packed_ids
from gptstore.types import Artifact, OptimizationContext

#: The loss of every step, written next to the weights a training step saves.
LOG_FILE = "training_log.json"


def token_blocks(tokenizer: Any, texts: list[str], seq_len: int) -> Any:
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


def warmup_cosine(step: int, warmup_steps: int, total: int) -> float:
    """The learning rate's factor at ``step``: linear warmup, then cosine decay to a tenth."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def copy_readme(source: Path, target: Path) -> None:
    """The parent's model card (license, languages, tags) goes with a derived model."""
    readme = source / "README.md"
    if readme.is_file() and not (target / "README.md").exists():
        (target / "README.md").write_bytes(readme.read_bytes())


def training_texts(context: OptimizationContext, tokenizer: Any) -> list[str]:
    """The user's data (chats rendered with the model's template), else the built-in corpus's
    training part (its held-out tenth is never seen)."""
    texts = context.data.texts(chat_renderer(tokenizer))
    return texts or split(default_dataset(), 0.1)[0].texts()


def heldout_split(blocks: Any, eval_fraction: float, seed: int) -> tuple[Any, Any]:
    """(held-out, train) blocks: a seeded ``eval_fraction`` of them held out (none at 0)."""
    import torch

    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(blocks) * eval_fraction)) if eval_fraction else 0
    return blocks[order[:held]], blocks[order[held:]]


def step_count(max_steps: int, epochs: float | None, train_blocks: int, batch_size: int) -> int:
    """``max_steps``, or with ``epochs`` the steps that many passes over the blocks take."""
    if epochs is None:
        return max_steps
    return max(1, math.ceil(epochs * train_blocks / batch_size))


def block_perplexity(model: Any, blocks: Any, batch_size: int) -> float:
    """exp of the mean loss over every token of each block but its first (the tokens a plain
    model predicts). A model with virtual tokens in front also predicts the first one from
    them; leaving it out measures it on the same tokens as its base, as the torch runner's
    log-probabilities do. For a plain or LoRA model this is lora's own measure."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            labels = batch.clone()
            labels[:, 0] = -100
            loss = model(input_ids=batch, labels=labels).loss
            tokens = batch.numel() - len(batch)
            total += float(loss) * tokens
            count += tokens
    return math.exp(total / count)


def train_steps(
    model: Any,
    train: Any,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    seed: int,
    context: OptimizationContext,
    span: tuple[float, float] = (0.05, 0.9),
) -> list[float]:
    """AdamW over the model's trainable parameters with :func:`warmup_cosine`, on seeded
    reshuffles of the ``train`` blocks; after every step, a check for cancellation and progress
    within ``span``. Returns every step's loss."""
    import torch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, steps)
    )
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    position = len(train)  # start with a fresh shuffle
    for step in range(steps):
        if position + batch_size > len(train):
            train = train[torch.randperm(len(train), generator=generator)]
            position = 0
        batch = train[position : position + batch_size]
        position += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        context.check_cancelled()
        spent = time.perf_counter() - started
        eta = spent / (step + 1) * (steps - step - 1)
        context.progress(
            span[0] + (span[1] - span[0]) * (step + 1) / steps,
            f"step {step + 1}/{steps} loss {losses[-1]:.3f} eta {eta:.0f}s",
        )
    return losses


def training_metrics(
    model: Any,
    losses: list[float],
    *,
    started: float,
    train_blocks: int,
    heldout_blocks: int,
    heldout_perplexity: float | None,
) -> dict[str, float]:
    """The figures a training step records after it (lora's names): trainable parameters and
    their share, steps, final loss, wall time since ``started`` (``time.perf_counter()``), peak
    resident memory, the blocks used, and the held-out perplexity when measured."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    metrics = {
        "trainable_parameters": float(trainable),
        "trainable_share": trainable / total,
        "steps": float(len(losses)),
        "final_loss": losses[-1],
        "wall_time_s": time.perf_counter() - started,
        "peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "train_blocks": float(train_blocks),
        "heldout_blocks": float(heldout_blocks),
    }
    if heldout_perplexity is not None:
        metrics["heldout_perplexity"] = heldout_perplexity
    return metrics


@frozen(kw_only=True)
class TrainingOptions:
    """The options every peft training strategy takes; a strategy's own options subclass this
    and add its method's and a ``learning_rate``.

    :param max_steps: optimizer steps (unless ``epochs`` is set: that many passes over the
        training blocks).
    :param eval_fraction: share of the blocks held out to measure perplexity before and after.
    :param threads: torch's intra-op threads (default: all cores).
    """

    max_steps: int = field(default=100, validator=in_range(1, 10**7))
    epochs: float | None = field(default=None, validator=in_range(0, 1e4, open_low=True))
    batch_size: int = field(default=4, validator=in_range(1, 4096))
    seq_len: int = field(default=256, validator=in_range(8, 1 << 20))
    warmup_steps: int = field(default=10, validator=at_least(0))
    seed: int = 0
    eval_fraction: float = field(default=0.1, validator=in_range(0, 0.9))
    threads: int | None = field(default=None, validator=at_least(1))


def train_adapter(
    artifact: Artifact,
    context: OptimizationContext,
    options: TrainingOptions,
    *,
    strategy: str,
    learning_rate: float,
    wrap: Callable[[Any, Any], Any],
    check: Callable[[Any, Any], None] | None = None,
    merge: bool = False,
) -> Artifact:
    """Train a peft method on ``artifact`` and save the result into ``context.output_dir``.

    Loads the model (safetensors, no remote code), runs ``check(model, tokenizer)`` (refuse
    options the model cannot take), packs the data into blocks and holds some out, measures
    their perplexity, lets ``wrap(model, tokenizer)`` return the peft model (the method), trains
    it with :func:`train_steps`, measures again, and saves the adapter (kind ``adapter``) or,
    with ``merge``, the merged model (kind ``hf``), with the tokenizer, the loss log, the
    parent's README and a manifest of the figures :func:`training_metrics` lists."""
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    started = time.perf_counter()
    context.progress(0.0, "loading the model")
    model, tokenizer = load_causal_lm(artifact, strategy)
    if check is not None:
        check(model, tokenizer)
    blocks = token_blocks(tokenizer, training_texts(context, tokenizer), options.seq_len)
    heldout, train = heldout_split(blocks, options.eval_fraction, options.seed)
    held = len(heldout)
    context.check_cancelled()
    context.progress(0.02, "measuring held-out perplexity before training")
    before = block_perplexity(model, heldout, options.batch_size) if held else None
    model = wrap(model, tokenizer)
    context.check_cancelled()
    losses = train_steps(
        model,
        train,
        steps=step_count(options.max_steps, options.epochs, len(train), options.batch_size),
        batch_size=options.batch_size,
        learning_rate=learning_rate,
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
    if merge:
        context.progress(0.95, "merging the adapter into the weights")
        model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / LOG_FILE).write_text(json.dumps({"loss": losses, "steps": len(losses)}, indent=1))
    copy_readme(artifact.path, out)
    context.progress(1.0, "done")
    manifest = derive_manifest(
        artifact,
        out,
        strategy=strategy,
        options=unstructure(options),
        kind="hf" if merge else "adapter",
        data_digest=context.data.digest or f"default:{DEFAULT_CORPUS}",
        metrics_before={"heldout_perplexity": before} if before is not None else {},
        metrics_after=metrics_after,
    )
    return Artifact(out, manifest)
