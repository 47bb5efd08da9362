"""``prune-layers``: drop whole decoder layers, those that change the hidden state least.

A layer's importance is ShortGPT's block influence (Men et al., 2024): one minus the mean cosine
similarity between the hidden state entering the layer and the one leaving it, over calibration
tokens. A layer whose output points where its input did adds little; removing it costs little.
The kept layers are renumbered (each attention's ``layer_idx``, which indexes the KV cache) and
the config follows (``num_hidden_layers`` and per-layer lists such as ``layer_types``), so the
result loads with plain ``AutoModelForCausalLM.from_pretrained`` and generates with its cache.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen

from gptstore.plugin import FieldProblem, InvalidInput, OptimizationContext, in_range
from gptstore_prune.pruning import (
    Pruned,
    PruneOptions,
    PruneStrategy,
    decoder_layers,
    rounded_share,
    run_blocks,
)

ATTENTION = {"self_attn": ("layer_idx",)}
#: Config entries with one item per layer, cut with the layers. (An entry listing layer indices,
#: such as Qwen2-MoE's ``mlp_only_layers``, would need renumbering instead: such models refuse.)
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
LAYER_INDEX_CONFIG = ("mlp_only_layers",)
#: The share of layers dropped when neither ``count`` nor ``fraction`` is given.
DEFAULT_FRACTION = 0.25


@frozen(kw_only=True)
class PruneLayersOptions(PruneOptions):
    """Give ``count`` or ``fraction``, not both (neither: a quarter of the layers).

    :param count: how many decoder layers to drop.
    :param fraction: the share of decoder layers to drop, rounded to whole layers (half up).
    """

    count: int | None = field(default=None, validator=in_range(1, 1 << 16))
    fraction: float | None = field(default=None, validator=in_range(0, 0.95, open_low=True))

    def __attrs_post_init__(self) -> None:
        if self.count is not None and self.fraction is not None:
            raise FieldProblem("fraction", "give count or fraction, not both")

    def dropped(self, total: int) -> int:
        """How many of ``total`` layers to drop; InvalidInput when none or all."""
        if self.count is None:
            return rounded_share(
                DEFAULT_FRACTION if self.fraction is None else self.fraction,
                total,
                "decoder layers",
            )
        if self.count >= total:
            raise InvalidInput(
                "count",
                [
                    f"count {self.count} would drop all {total} decoder layers; "
                    f"at most {total - 1} can go"
                ],
            )
        return self.count


def _layers(model: Any) -> list[Any]:
    layers = decoder_layers(model, "prune-layers", ATTENTION)
    indexed = [n for n in LAYER_INDEX_CONFIG if getattr(model.config, n, None)]
    if indexed:
        raise InvalidInput(
            "artifact",
            [f"prune-layers cannot renumber the layer indices of config {', '.join(indexed)}"],
        )
    return layers


def _hidden(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


def block_influence(model: Any, blocks: Any, context: OptimizationContext) -> list[float]:
    """Per layer, 1 - the mean cosine similarity of its input and output hidden states."""
    import torch

    layers = _layers(model)
    inputs: list[Any] = [None] * len(layers)
    sums = [0.0] * len(layers)
    tokens = [0] * len(layers)

    def enter(index: int) -> Any:
        def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()

        return record

    def leave(index: int) -> Any:
        def record(_module: Any, _args: Any, output: Any) -> None:
            before, after = inputs[index].float(), _hidden(output).detach().float()
            similarity = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            sums[index] += float(similarity.sum())
            tokens[index] += similarity.numel()

        return record

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave(i)))
    try:
        run_blocks(model, blocks, context)
    finally:
        for handle in handles:
            handle.remove()
    return [1 - total / count for total, count in zip(sums, tokens, strict=True)]


def drop_layers(model: Any, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (sorted original indices), renumbered 0.., and cut
    the config's per-layer entries to match."""
    import torch

    layers = _layers(model)
    kept = [layers[i] for i in keep]
    for number, layer in enumerate(kept):
        for module in layer.modules():  # attention's layer_idx indexes the KV cache
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = number
    model.model.layers = torch.nn.ModuleList(kept)
    config = model.config
    for name in PER_LAYER_CONFIG:
        value = getattr(config, name, None)
        if isinstance(value, list | tuple) and len(value) == len(layers):
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(kept)


class PruneLayers(PruneStrategy):
    """The ``prune-layers`` strategy."""

    name = "prune-layers"
    options_type = PruneLayersOptions
    options: PruneLayersOptions

    def check(self, model: Any) -> None:
        self.options.dropped(len(_layers(model)))

    def prune(self, model: Any, calibration: Any, context: OptimizationContext) -> Pruned:
        total = len(_layers(model))
        dropped = self.options.dropped(total)
        context.progress(0.3, "measuring each layer's block influence")
        influence = block_influence(model, calibration, context)
        order = sorted(range(total), key=lambda i: influence[i])
        keep = sorted(order[dropped:])
        context.check_cancelled()
        context.progress(0.6, f"dropping {dropped} of {total} decoder layers")
        drop_layers(model, keep)
        return Pruned(
            kept={
                "num_hidden_layers": [total, len(keep)],
                "score": "block_influence",
                "block_influence": influence,
                "kept": keep,
                "dropped": sorted(order[:dropped]),
            },
            metrics={"num_hidden_layers": float(len(keep))},
        )
