"""Hook implementations of gptstore-lora. torch and peft are imported when a run starts."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import OptimizationStrategy, hookimpl
from gptstore_lora.train import Lora, LoraOptions


@hookimpl
def gptstore_optimization_strategies() -> Iterator[OptimizationStrategy]:
    yield OptimizationStrategy(
        name="lora",
        factory=Lora,
        options_type=LoraOptions,
        description="LoRA (or DoRA) fine-tuning with peft: an adapter, or merged into the model",
    )
