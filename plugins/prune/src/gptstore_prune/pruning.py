"""What the pruning strategies share: their calibration and evaluation options, token blocks,
perplexity, the Llama-style layer check, and :class:`PruneStrategy`, the one ``apply`` that
loads the model, measures it, lets the strategy cut it, measures it again, and saves it as a
plain Hugging Face folder with ``pruning.json`` (what was kept) and a derived manifest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    FieldProblem,
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

#: The file in each pruned artifact that says what was kept, layer by layer.
KEPT_FILE = "pruning.json"
#: The data digest recorded when the user gave no data: the built-in corpus's training part.
DEFAULT_DATA_DIGEST = "default:pydoc_data.topics"


def one_of(*choices: str) -> Any:
    """An attrs validator: the value is one of ``choices`` (the error lists them)."""

    def check(_instance: Any, attribute: Any, value: str) -> None:
        if value not in choices:
            raise FieldProblem(
                attribute.name,
                f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}",
            )

    check.json_schema = {"enum": list(choices)}  # type: ignore[attr-defined]  # as in_range's
    return check


@frozen(kw_only=True)
class PruneOptions:
    """Options every pruning strategy has.

    :param calibration_tokens: tokens of calibration text the importance is measured on.
    :param eval_tokens: held-out tokens perplexity is measured on, before and after.
    :param seq_len: tokens per block, for calibration and evaluation alike.
    """

    calibration_tokens: int = field(default=4096, validator=in_range(16, 1 << 24))
    eval_tokens: int = field(default=2048, validator=in_range(16, 1 << 24))
    seq_len: int = field(default=256, validator=in_range(8, 1 << 16))


@frozen(kw_only=True)
class Pruned:
    """What a strategy's cut did: ``kept`` is written to ``pruning.json``; ``metrics`` (the new
    shape: widths, head or layer counts) join the manifest's metrics after."""

    kept: dict[str, Any]
    metrics: dict[str, float]


def token_blocks(tokenizer: Any, texts: Sequence[str], tokens: int, seq_len: int) -> Any:
    """A [blocks, seq_len] tensor of packed token ids; InvalidInput when there is not one."""
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


def run_blocks(model: Any, blocks: Any, context: OptimizationContext) -> None:
    """Run the model over calibration blocks (hooks record what they need), cancellable."""
    import torch

    with torch.inference_mode():
        for block in blocks:
            context.check_cancelled()
            model(input_ids=block[None])


def input_norms(
    model: Any,
    modules: Sequence[Any],
    blocks: Any,
    context: OptimizationContext,
    squares: Callable[[int, Any], Any],
) -> list[Any]:
    """Per module, the L2 norm over the calibration blocks of what it takes in:
    ``squares(index, x)`` sums the squares of the input ``x`` of ``modules[index]`` (in float32)
    into the shape the caller scores (per channel, per head group)."""
    totals: list[Any] = [0.0] * len(modules)

    def hook(index: int) -> Any:
        def record(_module: Any, inputs: tuple[Any, ...]) -> None:
            totals[index] = totals[index] + squares(index, inputs[0].detach().float())

        return record

    handles = [module.register_forward_pre_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        run_blocks(model, blocks, context)
    finally:
        for handle in handles:
            handle.remove()
    return [total.sqrt() for total in totals]


def decoder_layers(model: Any, strategy: str, modules: Mapping[str, Sequence[str]]) -> list[Any]:
    """The decoder layers of a Llama-style model (``model.model.layers``), each checked to have
    the named sub-modules (``{"mlp": ("gate_proj", ...)}``); InvalidInput naming them otherwise."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(
        hasattr(getattr(layer, part, None), name)
        for layer in layers
        for part, names in modules.items()
        for name in names
    ):
        wanted = "; ".join(f"{part}.{', '.join(names)}" for part, names in modules.items())
        raise InvalidInput(
            "artifact",
            [
                f"{strategy} takes Llama-style decoders (model.layers[i] with {wanted}); "
                f"this is {type(model).__name__}"
            ],
        )
    return list(layers)


def sliced_linear(linear: Any, rows: Any = None, columns: Any = None) -> Any:
    """A new Linear with only ``rows`` of ``linear``'s outputs (bias included) and ``columns``
    of its inputs (index lists or tensors; None: all)."""
    import torch

    weight, bias = linear.weight.data, linear.bias
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    new = torch.nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.data = weight.clone()
    if bias is not None:
        new.bias.data = (bias.data if rows is None else bias.data[rows]).clone()
    return new


def rounded_share(fraction: float, total: int, what: str) -> int:
    """How many of ``total`` things ``fraction`` removes, rounded half up; InvalidInput when that
    is none or all of them (at least one is always kept)."""
    count = math.floor(fraction * total + 0.5)
    if 1 <= count < total:
        return count
    outcome = "removes none" if count < 1 else "removes all of them; at least one must stay"
    raise InvalidInput(
        "fraction",
        [
            f"fraction {fraction:g} of {total} {what} {outcome} "
            f"({fraction:g} x {total} = {fraction * total:.3g} rounds to {count})"
        ],
    )


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


class PruneStrategy:
    """A pruning strategy: subclasses name themselves and their options type and implement
    :meth:`prune`; ``apply`` does the rest, the same way for each."""

    name: ClassVar[str]
    options_type: ClassVar[type[PruneOptions]]

    def __init__(self, options: PruneOptions | None = None) -> None:
        self.options = options or self.options_type()

    def check(self, model: Any) -> None:
        """Raise InvalidInput when this strategy cannot prune ``model`` with these options;
        called before anything is measured."""

    def prune(self, model: Any, calibration: Any, context: OptimizationContext) -> Pruned:
        """Measure importance on the ``calibration`` blocks and cut ``model`` in place (its
        config included), reporting progress between 0.3 and 0.6."""
        raise NotImplementedError

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options
        context.progress(0.0, "loading the model")
        model, tokenizer = load_causal_lm(artifact, self.name)
        model.eval()
        self.check(model)
        context.check_cancelled()

        train, heldout_data = split(default_dataset(), 0.1)
        if context.data:
            calibration_texts = context.data.texts(chat_renderer(tokenizer))
            data_digest = context.data.digest
        else:  # the built-in corpus: calibrate on its training part
            calibration_texts = train.texts()
            data_digest = DEFAULT_DATA_DIGEST
        calibration = token_blocks(
            tokenizer, calibration_texts, options.calibration_tokens, options.seq_len
        )
        heldout = token_blocks(
            tokenizer, heldout_data.texts(), options.eval_tokens, options.seq_len
        )
        parameters_before = parameter_count(model)
        context.progress(0.1, "measuring held-out perplexity before pruning")
        before = perplexity(model, heldout)
        context.check_cancelled()
        pruned = self.prune(model, calibration, context)
        context.check_cancelled()
        context.progress(0.7, "measuring held-out perplexity after pruning")
        after = perplexity(model, heldout)

        out = context.output_dir
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / KEPT_FILE).write_text(json.dumps(pruned.kept))
        readme = artifact.path / "README.md"
        if readme.is_file():
            (out / "README.md").write_bytes(readme.read_bytes())
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            out,
            strategy=self.name,
            options=unstructure(options),
            kind="hf",
            data_digest=data_digest,
            metrics_before={"parameters": float(parameters_before), "heldout_perplexity": before},
            metrics_after={
                "parameters": float(parameter_count(model)),
                "heldout_perplexity": after,
                **pruned.metrics,
            },
        )
        return Artifact(out, manifest)
