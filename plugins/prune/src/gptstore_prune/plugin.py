"""Hook implementations of gptstore-prune. torch and transformers load when a run starts."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import OptimizationStrategy, hookimpl
from gptstore_prune.mlp import PruneMlp, PruneMlpOptions


@hookimpl
def gptstore_optimization_strategies() -> Iterator[OptimizationStrategy]:
    yield OptimizationStrategy(
        name="prune-mlp",
        factory=PruneMlp,
        options_type=PruneMlpOptions,
        description="Remove a share of every layer's MLP channels, ranked by activation x "
        "down-projection norm on calibration text",
    )
