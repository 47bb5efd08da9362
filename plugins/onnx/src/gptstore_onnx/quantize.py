"""The ``onnx-quantize`` strategy: 8- or 4-bit weights in blocks (MatMulNBits), or dynamic int8,
with the perplexity change measured through the onnx runner and an optional gate on it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

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
    :param offsets: 4-bit blocks as Q4_1 stores them: a float offset per block (its smallest
        weight) plus ``k·d`` for k in 0..15. MatMulNBits computes the ``k·d`` part; the offsets
        come in as the input's block sums times a small offset matrix (4 more nodes and about
        a quarter more bytes per projection). A model whose weights were Q4_1 (SmolLM2 from its
        GGUF) is then represented exactly, where integer zero points round every block again.
        ``bits = 4`` only.
    :param per_channel: per-channel weight scales (``dynamic`` only).
    :param max_perplexity_increase: refuse the result above this relative increase (0.03 is
        +3%); None records the change without a bound.
    """

    method: Literal["weight-only", "dynamic"] = "weight-only"
    bits: Literal[4, 8] = 8
    block_size: int = field(default=32, validator=_block_size)
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    offsets: bool = False
    per_channel: bool = False
    max_perplexity_increase: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.method == "dynamic" and self.bits != 8:
            raise ValueError('method = "dynamic" quantizes to 8 bits; 4 bits is weight-only')
        if self.offsets and (self.bits != 4 or self.method != "weight-only"):
            raise ValueError("offsets = true is a form of 4-bit weight-only blocks: set bits = 4")


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
    bits, symmetric, keep = options.bits, options.symmetric, []
    if options.offsets:
        # The projections go to 4 bits with offsets; the output projection, and any weight
        # whose rows are not whole blocks, to 8-bit blocks below (as llama.cpp's Q4_1 files keep
        # the output layer at Q8_0); the small offset products stay float: they are exact.
        keep = quantize_with_offsets(model, options.block_size, options.accuracy_level)
        bits, symmetric = 8, True
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=options.block_size,
        is_symmetric=symmetric,
        accuracy_level=options.accuracy_level,
        nodes_to_exclude=keep,
    )
    quantizer.process()
    save_model(quantizer.model.model, target.parent)


def quantize_with_offsets(model: Any, block: int, accuracy_level: int) -> list[str]:
    """Replace every MatMul of a constant [K, N] weight (K a multiple of ``block``) but the
    output projection (the one that makes ``logits``) with 4-bit blocks along K plus float
    block offsets, in place; return the names of the offset products (to stay float).

    Each block of a column holds ``m + k·d``: m its smallest weight, d its range over 15 steps,
    k in 0..15. MatMulNBits without zero points computes ``(k - 8)·d``, so the offsets are
    ``m + 8·d``, and ``x @ W = MatMulNBits(x) + blocksums(x) @ offsets``. The input must be
    [batch, sequence, K], as a decoder's projections are.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    offset_products: list[str] = []
    nodes = []
    for node in model.graph.node:
        init = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        w = numpy_helper.to_array(init) if init is not None else None
        output = node.output[0] == "logits" or "lm_head" in node.name
        if w is None or output or w.ndim != 2 or w.dtype != np.float32 or w.shape[0] % block:
            nodes.append(node)
            continue
        k, n = w.shape
        blocks = w.T.reshape(n, k // block, block).astype(np.float64)
        low, high = blocks.min(axis=-1), blocks.max(axis=-1)
        step = (high - low) / 15
        step[step == 0] = 1.0
        q = np.clip(np.rint((blocks - low[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
        offsets = (low + 8 * step).T.astype(np.float32)  # [blocks, n]
        name, out = node.input[1], node.output[0]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(packed, f"{name}.q4"),
                numpy_helper.from_array(step.astype(np.float32).reshape(-1), f"{name}.scales"),
                numpy_helper.from_array(offsets, f"{name}.offsets"),
                numpy_helper.from_array(
                    np.array([0, 0, k // block, block], np.int64), f"{name}.blocks"
                ),
                numpy_helper.from_array(np.array([-1], np.int64), f"{name}.last"),
            ]
        )
        nodes += [
            helper.make_node(
                "MatMulNBits",
                [node.input[0], f"{name}.q4", f"{name}.scales"],
                [f"{out}.q4"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=accuracy_level,
            ),
            helper.make_node("Reshape", [node.input[0], f"{name}.blocks"], [f"{out}.blocked"]),
            helper.make_node(
                "ReduceSum", [f"{out}.blocked", f"{name}.last"], [f"{out}.sums"], keepdims=0
            ),
            helper.make_node(
                "MatMul",
                [f"{out}.sums", f"{name}.offsets"],
                [f"{out}.offset"],
                name=f"{out}.offset_matmul",
            ),
            helper.make_node("Add", [f"{out}.q4", f"{out}.offset"], [out]),
        ]
        model.graph.initializer.remove(init)
        offset_products.append(f"{out}.offset_matmul")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return offset_products


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
