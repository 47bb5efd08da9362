"""``prune-mlp``: remove a fraction of every decoder layer's MLP channels, the same count in
each layer, so the result is a plain Llama-style model with a smaller ``intermediate_size``
that ``AutoModelForCausalLM.from_pretrained`` loads, ``onnx-export`` exports and both serving
backends serve.

A channel's importance is the L2 norm of its activation (``act(gate(x)) * up(x)``, the
down-projection's input) over calibration tokens, times the L2 norm of its down-projection
column: how much it can move the residual stream. Weight magnitude alone is far worse (on
SmolLM2, cutting 30% by weight magnitude sent held-out perplexity from 10.9 to 252,545; by this
score, to 30.7).
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from gptstore.plugin import InvalidInput, OptimizationContext, in_range
from gptstore_prune.pruning import (
    Pruned,
    PruneOptions,
    PruneStrategy,
    decoder_layers,
    input_norms,
    sliced_linear,
)

MLP = {"mlp": ("gate_proj", "up_proj", "down_proj")}


@frozen(kw_only=True)
class PruneMlpOptions(PruneOptions):
    """:param fraction: share of each layer's MLP channels to remove (0.3: 30%).
    :param multiple_of: the kept count is rounded down to a multiple of this (fast kernels).
    """

    fraction: float = field(default=0.3, validator=in_range(0, 0.95, open_low=True))
    multiple_of: int = field(default=8, validator=in_range(1, 4096))


def _layers(model: Any) -> list[Any]:
    return decoder_layers(model, "prune-mlp", MLP)


def channel_importance(model: Any, blocks: Any, context: OptimizationContext) -> list[Any]:
    """Per layer, each MLP channel's activation norm times its down-projection column norm."""

    layers = _layers(model)
    norms = input_norms(
        model,
        [layer.mlp.down_proj for layer in layers],
        blocks,
        context,
        lambda _index, x: x.pow(2).sum(dim=(0, 1)),
    )
    return [
        norm * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        for norm, layer in zip(norms, layers, strict=True)
    ]


def prune_channels(model: Any, keep: list[Any]) -> None:
    """Cut every layer's MLP to the channels in ``keep`` (one sorted index tensor per layer)."""
    for layer, kept in zip(_layers(model), keep, strict=True):
        mlp = layer.mlp
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=kept)
        mlp.up_proj = sliced_linear(mlp.up_proj, rows=kept)
        mlp.down_proj = sliced_linear(mlp.down_proj, columns=kept)
    model.config.intermediate_size = len(keep[0])


class PruneMlp(PruneStrategy):
    """The ``prune-mlp`` strategy."""

    name = "prune-mlp"
    options_type = PruneMlpOptions
    options: PruneMlpOptions

    def check(self, model: Any) -> None:
        width = _layers(model)[0].mlp.down_proj.in_features
        if self.options.multiple_of >= width:
            raise InvalidInput(
                "options",
                [
                    f"multiple_of {self.options.multiple_of} is not below the MLP width {width}; "
                    "choose a smaller multiple_of"
                ],
            )

    def prune(self, model: Any, calibration: Any, context: OptimizationContext) -> Pruned:
        import torch

        options = self.options
        context.progress(0.3, "measuring channel importance on the calibration data")
        scores = channel_importance(model, calibration, context)
        width = len(scores[0])
        kept_count = int(width * (1 - options.fraction)) // options.multiple_of
        kept_count = max(options.multiple_of, kept_count * options.multiple_of)
        keep = [torch.sort(torch.topk(s, kept_count).indices).values for s in scores]
        context.check_cancelled()
        context.progress(0.6, f"keeping {kept_count} of {width} MLP channels per layer")
        prune_channels(model, keep)
        return Pruned(
            kept={"intermediate_size": [width, kept_count], "kept": [k.tolist() for k in keep]},
            metrics={"intermediate_size": float(kept_count)},
        )
