"""Hook implementations of gptstore-onnx. onnxruntime and optimum load inside factories' work."""

from __future__ import annotations

from collections.abc import Iterator

from gptstore.plugin import OptimizationStrategy, ServingBackend, hookimpl
from gptstore_onnx.export import ExportOptions, OnnxExport
from gptstore_onnx.quantize import OnnxQuantize, QuantizeOptions
from gptstore_onnx.runner import OrtBackend, OrtOptions


@hookimpl
def gptstore_optimization_strategies() -> Iterator[OptimizationStrategy]:
    yield OptimizationStrategy(
        name="onnx-export",
        factory=OnnxExport,
        options_type=ExportOptions,
        description="Export to ONNX with KV cache, checked against torch's logits",
    )
    yield OptimizationStrategy(
        name="onnx-quantize",
        factory=OnnxQuantize,
        options_type=QuantizeOptions,
        description="8-bit weights (MatMulNBits blocks, or dynamic int8), perplexity change "
        "measured",
    )


@hookimpl
def gptstore_serving_backends() -> Iterator[ServingBackend]:
    yield ServingBackend(
        name="onnx",
        factory=OrtBackend,
        options_type=OrtOptions,
        description="ONNX Runtime (CUDA when present, else CPU)",
    )
