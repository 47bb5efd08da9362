"""What strategies that train with peft share: the data packed into token blocks (the user's,
else the built-in corpus's training part), a seeded held-out split, perplexity on blocks, a plain
AdamW loop with warmup and cosine decay that reports progress (loss and ETA) and honours
cancellation, and the figures a training step records. ``gptstore-lora`` and
``gptstore-prompt-tuning`` use them through :mod:`gptstore.plugin`.

torch is imported when these run (the strategies' dependency, not the core's).
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

from gptstore.errors import InvalidInput
from gptstore.optimization.data import default_dataset, split
from gptstore.optimization.models import chat_renderer, packed_ids
from gptstore.types import OptimizationContext

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
