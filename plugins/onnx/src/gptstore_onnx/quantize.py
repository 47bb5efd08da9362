"""The ``onnx-quantize`` strategy: 8- or 4-bit weights in blocks (MatMulNBits), or dynamic int8,
with the perplexity change measured through the onnx runner and an optional gate on it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from attrs import field, frozen

from gptstore.plugin import (
    DEFAULT_CORPUS,
    Artifact,
    Gate,
    OptimizationContext,
    default_texts,
    derive_manifest,
    perplexity,
    unstructure,
)
from gptstore_onnx.export import quiet, require_kind
from gptstore_onnx.graph import fold_constant_transposes, save_model
from gptstore_onnx.runner import MODEL_FILE, OrtOptions, OrtRunner


def _block_size(_instance: object, _attribute: object, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"block_size must be a power of two, at least 16, not {value}")


@frozen(kw_only=True)
class QuantizeOptions:
    """:param method: ``weight-only`` (default): ``bits``-bit weights in blocks of
        ``block_size``, one scale per block (ONNX Runtime's MatMulNBits); ``dynamic``: int8
        weights and activations quantized per multiplication (quantize_dynamic).
    :param bits: 8 (default; within a percent of fp32 perplexity on small models) or 4 (half
        the bytes again; what llama.cpp's Q4 formats store), ``weight-only`` only.
    :param block_size: weights per scale (a power of two, at least 16): smaller blocks keep more
        precision and cost more scales.
    :param symmetric: blocks without a zero point (int4 with one, ``False``, fits skewed blocks
        better).
    :param accuracy_level: what MatMulNBits computes in: 4 (default) int8, with the CPU's int8
        dot-product kernels where it has them; 0 the weights' float type; 1-3 fp32/fp16/bf16.
    :param per_channel: per-channel weight scales (``dynamic`` only).
    :param max_perplexity_increase: refuse the result above this relative increase (0.03 is
        +3%); None records the change without a bound.
    """

    method: Literal["weight-only", "dynamic"] = "weight-only"
    bits: Literal[4, 8] = 8
    block_size: int = field(default=32, validator=_block_size)
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    per_channel: bool = False
    max_perplexity_increase: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.method == "dynamic" and self.bits != 8:
            raise ValueError('method = "dynamic" quantizes to 8 bits; 4 bits is weight-only')


def quantize(source: Path, target: Path, options: QuantizeOptions) -> None:
    """Write a quantized version of the ONNX model ``source`` to ``target``."""
    if options.method == "dynamic":
        from onnx import TensorProto
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # ONNX's shape inference stops at fused com.microsoft operators; their outputs are float.
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=options.per_channel,
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # 8-bit blocks keep a small model's perplexity within a percent where per-tensor dynamic
    # quantization costs tens of percent; accuracy level 4 computes in int8 (fast on CPUs).
    model = onnx.load(str(source))
    fold_constant_transposes(model)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=options.bits,
        block_size=options.block_size,
        is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level,
    )
    quantizer.process()
    save_model(quantizer.model.model, target.parent)


def _perplexity(folder: Path, texts: list[str]) -> float:
    runner = OrtRunner(folder, OrtOptions())
    try:
        return perplexity(runner, texts)
    finally:
        runner.close()


class OnnxQuantize:
    def __init__(self, options: QuantizeOptions | None = None) -> None:
        self.options = options or QuantizeOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options
        require_kind(artifact, "onnx", "onnx-quantize", "an ONNX artifact (run onnx-export first)")
        # Conversations are rendered with the model's own chat template.
        runner = OrtRunner(artifact.path, OrtOptions())
        try:
            texts = context.data.texts(runner.chat_prompt) or default_texts()
            context.progress(0.05, "measuring the parent's perplexity")
            before = perplexity(runner, texts)
        finally:
            runner.close()
        context.check_cancelled()
        bits = 8 if options.method == "dynamic" else options.bits
        context.progress(0.3, f"quantizing weights to int{bits}")
        for path in artifact.path.iterdir():
            if (
                path.is_file()
                and not path.name.startswith(MODEL_FILE)
                and path.name != "manifest.json"
            ):
                shutil.copy2(path, context.output_dir / path.name)
        with quiet():
            quantize(artifact.path / MODEL_FILE, context.output_dir / MODEL_FILE, options)

        context.check_cancelled()
        context.progress(0.7, "measuring the quantized perplexity")
        after = _perplexity(context.output_dir, texts)
        change = after / before - 1
        Gate(
            metric=f"int{bits} perplexity", at_most=options.max_perplexity_increase, relative=True
        ).check(after, before)
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="onnx-quantize",
            options=unstructure(options),
            kind="onnx",
            data_digest=context.data.digest or f"default:{DEFAULT_CORPUS}",
            metrics_before={"perplexity": before},
            metrics_after={"perplexity": after, "perplexity_change": change},
        )
        return Artifact(context.output_dir, manifest)
