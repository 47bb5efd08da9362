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

import json
import math
from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    InvalidInput,
    OptimizationContext,
    chat_renderer,
    default_dataset,
    derive_manifest,
    in_range,
    load_causal_lm,
    packed_ids,
    split,
    unstructure,
)

KEPT_FILE = "pruning.json"


@frozen(kw_only=True)
class PruneMlpOptions:
    """:param fraction: share of each layer's MLP channels to remove (0.3: 30%).
    :param calibration_tokens: tokens of calibration text the importance is measured on.
    :param eval_tokens: held-out tokens perplexity is measured on, before and after.
    :param multiple_of: the kept count is rounded down to a multiple of this (fast kernels).
    """

    fraction: float = field(default=0.3, validator=in_range(0, 0.95, open_low=True))
    calibration_tokens: int = field(default=4096, validator=in_range(16, 1 << 24))
    eval_tokens: int = field(default=2048, validator=in_range(16, 1 << 24))
    seq_len: int = field(default=256, validator=in_range(8, 1 << 16))
    multiple_of: int = field(default=8, validator=in_range(1, 4096))


def _token_blocks(tokenizer: Any, texts: list[str], tokens: int, seq_len: int) -> Any:
    import torch

    blocks = packed_ids(tokenizer, texts, seq_len, max_tokens=tokens)
    if not blocks:
        raise InvalidInput("data", [f"the data makes no block of {seq_len} tokens"])
    return torch.tensor(blocks)


def perplexity(model: Any, blocks: Any) -> float:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for block in blocks:
            loss = model(input_ids=block[None], labels=block[None]).loss
            total += float(loss) * (block.numel() - 1)
            count += block.numel() - 1
    return math.exp(total / count)


def _layers(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(
        hasattr(getattr(layer, "mlp", None), name)
        for layer in layers
        for name in ("gate_proj", "up_proj", "down_proj")
    ):
        raise InvalidInput(
            "artifact",
            ["prune-mlp takes Llama-style decoders (mlp.gate_proj, up_proj, down_proj)"],
        )
    return list(layers)


def channel_importance(model: Any, blocks: Any) -> list[Any]:
    """Per layer, each MLP channel's activation norm times its down-projection column norm."""
    import torch

    layers = _layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]

    def hook(index: int) -> Any:
        def record(_module: Any, inputs: tuple[Any, ...]) -> None:
            sums[index] += inputs[0].detach().float().pow(2).sum(dim=(0, 1))

        return record

    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    try:
        with torch.inference_mode():
            for block in blocks:
                model(input_ids=block[None])
    finally:
        for handle in handles:
            handle.remove()
    return [
        total.sqrt() * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        for total, layer in zip(sums, layers, strict=True)
    ]


def prune_channels(model: Any, keep: list[Any]) -> None:
    """Cut every layer's MLP to the channels in ``keep`` (one sorted index tensor per layer)."""
    import torch

    for layer, kept in zip(_layers(model), keep, strict=True):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(kept), bias=old.bias is not None)
            new.weight.data = old.weight.data[kept].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[kept].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(len(kept), old.out_features, bias=old.bias is not None)
        new.weight.data = old.weight.data[:, kept].clone()
        if old.bias is not None:
            new.bias.data = old.bias.data.clone()
        mlp.down_proj = new
    model.config.intermediate_size = len(keep[0])


class PruneMlp:
    """The ``prune-mlp`` strategy."""

    def __init__(self, options: PruneMlpOptions | None) -> None:
        self.options = options or PruneMlpOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        import torch

        options = self.options
        context.progress(0.0, "loading the model")
        model, tokenizer = load_causal_lm(artifact, "prune-mlp")
        model.eval()

        if context.data:
            calibration_texts = context.data.texts(chat_renderer(tokenizer))
            data_digest = context.data.digest
        else:  # the built-in corpus: calibrate on its training part
            calibration_texts = split(default_dataset(), 0.1)[0].texts()
            data_digest = "default:pydoc_data.topics"
        heldout_texts = split(default_dataset(), 0.1)[1].texts()
        calibration = _token_blocks(
            tokenizer, calibration_texts, options.calibration_tokens, options.seq_len
        )
        heldout = _token_blocks(tokenizer, heldout_texts, options.eval_tokens, options.seq_len)
        parameters_before = sum(p.numel() for p in model.parameters())
        context.progress(0.1, "measuring held-out perplexity before pruning")
        before = perplexity(model, heldout)
        context.check_cancelled()
        context.progress(0.3, "measuring channel importance on the calibration data")
        scores = channel_importance(model, calibration)
        width = len(scores[0])
        kept_count = int(width * (1 - options.fraction)) // options.multiple_of
        kept_count = max(options.multiple_of, kept_count * options.multiple_of)
        keep = [torch.sort(torch.topk(s, kept_count).indices).values for s in scores]
        context.check_cancelled()
        context.progress(0.6, f"keeping {kept_count} of {width} MLP channels per layer")
        prune_channels(model, keep)
        context.progress(0.7, "measuring held-out perplexity after pruning")
        after = perplexity(model, heldout)
        out = context.output_dir
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / KEPT_FILE).write_text(
            json.dumps(
                {"intermediate_size": [width, kept_count], "kept": [k.tolist() for k in keep]}
            )
        )
        readme = artifact.path / "README.md"
        if readme.is_file():
            (out / "README.md").write_bytes(readme.read_bytes())
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            out,
            strategy="prune-mlp",
            options=unstructure(options),
            kind="hf",
            data_digest=data_digest,
            metrics_before={"parameters": float(parameters_before), "heldout_perplexity": before},
            metrics_after={
                "parameters": float(sum(p.numel() for p in model.parameters())),
                "heldout_perplexity": after,
                "intermediate_size": float(kept_count),
            },
        )
        return Artifact(out, manifest)
