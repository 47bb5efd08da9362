"""The ``onnx-quantize`` strategy: 8-bit weights (MatMulNBits blocks, or dynamic int8), with
the perplexity change measured through the onnx runner and an optional gate on it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from attrs import frozen

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


@frozen(kw_only=True)
class QuantizeOptions:
    """:param method: ``weight-only`` (default): int8 weights in blocks of ``block_size`` with
        int8 compute (ONNX Runtime's MatMulNBits, accuracy level 4); ``dynamic``: int8 weights and
        activations quantized per multiplication (quantize_dynamic).
    :param per_channel: per-channel weight scales (``dynamic`` only).
    :param max_perplexity_increase: refuse the result above this relative increase (0.03 is
        +3%); None records the change without a bound.
    """

    method: Literal["weight-only", "dynamic"] = "weight-only"
    block_size: int = 32
    per_channel: bool = False
    max_perplexity_increase: float | None = None


def quantize(source: Path, target: Path, options: QuantizeOptions) -> None:
    """Write an int8 version of the ONNX model ``source`` to ``target``."""
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
        bits=8,
        block_size=options.block_size,
        is_symmetric=True,
        accuracy_level=4,
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
        context.progress(0.3, "quantizing weights to int8")
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
            metric="int8 perplexity", at_most=options.max_perplexity_increase, relative=True
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
