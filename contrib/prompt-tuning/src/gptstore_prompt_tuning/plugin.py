"""Hook implementations of gptstore-prompt-tuning. torch and peft are imported when a run
starts."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import OptimizationStrategy, hookimpl
from gptstore_prompt_tuning.train import STRATEGY, PromptTuning, PromptTuningOptions


@hookimpl
def gptstore_optimization_strategies() -> Iterator[OptimizationStrategy]:
    yield OptimizationStrategy(
        name=STRATEGY,
        factory=PromptTuning,
        options_type=PromptTuningOptions,
        description="prompt tuning with peft: trained virtual tokens in front of a frozen model",
    )
