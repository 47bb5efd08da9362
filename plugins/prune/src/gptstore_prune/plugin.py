"""Hook implementations of gptstore-prune. torch and transformers load when a run starts."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import OptimizationStrategy, hookimpl
from gptstore_prune.heads import PruneHeads, PruneHeadsOptions
from gptstore_prune.layers import PruneLayers, PruneLayersOptions
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
    yield OptimizationStrategy(
        name="prune-heads",
        factory=PruneHeads,
        options_type=PruneHeadsOptions,
        description="Remove a share of every layer's attention head groups (a key/value head "
        "with its query heads), ranked by their output's norm on calibration text",
    )
    yield OptimizationStrategy(
        name="prune-layers",
        factory=PruneLayers,
        options_type=PruneLayersOptions,
        description="Drop whole decoder layers, those that change the hidden state least on "
        "calibration text (ShortGPT block influence)",
    )
