"""Optimization strategies ``onnx-export`` and ``onnx-quantize``."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from attrs import field, frozen

from gptstore.artifacts import derive_manifest
from gptstore.converter import unstructure
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.optimize import data_digest
from gptstore.types import Artifact, OptimizationContext, str_tuple
from gptstore_onnx.attention import grouped_attention
from gptstore_onnx.runner import MODEL_FILE, OrtOptions, OrtRunner

DEFAULT_PROMPTS = ("Hello, my name is", "The capital of France is", "def fibonacci(n):\n    return")


def default_text() -> str:
    """Text every Python install has, for perplexity when no data is given."""
    import pydoc_data.topics

    return pydoc_data.topics.topics["assignment"][:3000]


@frozen(kw_only=True)
class ExportOptions:
    """:param max_logit_diff: the largest |logit(onnx) - logit(torch)| allowed on the prompts.
    :param fuse: fuse RMSNorm, residual-add + RMSNorm and rotary-embedding subgraphs into ONNX
        Runtime's fused operators, and join the projections of one input into one MatMul, before
        verification (fewer, larger operators per token).
    :param grouped_attention: export grouped-query attention without repeating the key/value
        heads at every step (see ``gptstore_onnx.attention``).
    """

    verify_prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, converter=str_tuple)
    max_logit_diff: float = 1e-3
    opset: int | None = None
    fuse: bool = True
    grouped_attention: bool = True


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


def max_logit_difference(torch_folder: Path, onnx_folder: Path, prompts: Sequence[str]) -> float:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        torch_folder,
        dtype=torch.float32,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    ).eval()
    runner = OrtRunner(onnx_folder, OrtOptions())
    worst = 0.0
    try:
        for prompt in prompts:
            ids = runner.tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)
            mask = np.ones_like(ids)
            positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
            onnx_logits, _ = runner.forward(ids, mask, positions, None)
            with torch.inference_mode():
                torch_logits = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
            worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
    finally:
        runner.close()
    return worst


def perplexity(folder: Path, texts: Sequence[str]) -> float:
    runner = OrtRunner(folder, OrtOptions())
    try:
        scores = [v for r in runner.logprobs(list(texts)) for v in r.logprobs if v is not None]
    finally:
        runner.close()
    if not scores:
        raise InvalidInput("data", ["the texts have no tokens to measure perplexity on"])
    return math.exp(-sum(scores) / len(scores))


def fuse_graph(folder: Path) -> int:
    """Rewrite ``folder``'s model with ONNX Runtime's fused decoder operators and packed
    projections (:func:`pack_matmuls`); return how many fused operators and packed MatMuls.

    Uses onnxruntime's transformer optimizer with its attention fusion off: attention, the KV
    cache and the graph's inputs and outputs stay as exported.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_embed_layer_norm = False
    options.enable_qordered_matmul = False
    model = optimize_model(
        str(folder / MODEL_FILE),
        model_type="gpt2",
        num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        optimization_options=options,
        opt_level=0,
    )
    fused = int(sum(model.get_fused_operator_statistics().values()))
    trim_rotary_caches(model.model, int(getattr(config, "max_position_embeddings", 0) or 0))
    fused += pack_matmuls(model.model)
    if fused:
        save_model(model.model, folder)
    return fused


def trim_rotary_caches(model: Any, positions: int) -> None:
    """Cut the cos/sin tables of fused rotary embeddings to the model's context: the fusion
    writes them for up to 128k positions (32 MB for SmolLM2, whose context is 8k)."""
    from onnx import numpy_helper

    if positions <= 0:
        return
    tables = {
        node.input[i]
        for node in model.graph.node
        if node.op_type == "RotaryEmbedding"
        for i in (2, 3)
    }
    for index, initializer in enumerate(model.graph.initializer):
        if initializer.name in tables and initializer.dims[0] > positions:
            array = numpy_helper.to_array(initializer)[:positions]
            model.graph.initializer[index].CopyFrom(
                numpy_helper.from_array(array, initializer.name)
            )


def pack_matmuls(model: Any) -> int:
    """Join MatMuls that multiply the same input by constant weights (a layer's query, key and
    value projections; its gate and up projections) into one MatMul and a Split; return how
    many joined MatMuls there are. Exact: each output column is computed as before, in fewer,
    larger products. Weight-only quantization then quantizes the joined weight per column block
    as it would have the parts; per-tensor ``dynamic`` quantization gives the joined weight one
    scale where the parts had one each."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    groups: dict[str, list[Any]] = {}
    for node in graph.node:
        if (
            node.op_type == "MatMul"
            and node.input[1] in constants
            and len(constants[node.input[1]].dims) == 2
        ):
            groups.setdefault(node.input[0], []).append(node)
    packed = 0
    for source, nodes in groups.items():
        weights = [numpy_helper.to_array(constants[n.input[1]]) for n in nodes]
        if len(nodes) < 2 or len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        name = f"{nodes[0].name or nodes[0].output[0]}/packed"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate(weights, axis=1), f"{name}.weight"),
                numpy_helper.from_array(
                    np.array([w.shape[1] for w in weights], dtype=np.int64), f"{name}.sizes"
                ),
            ]
        )
        at = list(graph.node).index(nodes[0])
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(
            at,
            helper.make_node(
                "Split",
                [f"{name}.out", f"{name}.sizes"],
                [n.output[0] for n in nodes],
                name=f"{name}.split",
                axis=-1,
            ),
        )
        graph.node.insert(
            at, helper.make_node("MatMul", [source, f"{name}.weight"], [f"{name}.out"], name=name)
        )
        packed += 1
    if packed:
        used = {name for node in graph.node for name in node.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return packed


def save_model(model: Any, folder: Path) -> None:
    """Replace ``folder``'s model.onnx (and its external data) with ``model``.

    Written beside, then moved in; models over protobuf's 2 GB limit keep their weights in
    ``model.onnx.data``. The com.microsoft opset is declared when fused operators use it.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    large = model.ByteSize() > 2**31 - 2**24
    with tempfile.TemporaryDirectory(dir=folder, prefix=".save-") as tmp:
        OnnxModel.save(model, str(Path(tmp) / MODEL_FILE), save_as_external_data=large)
        for old in folder.glob(MODEL_FILE + "*"):
            old.unlink()
        for new in Path(tmp).iterdir():
            new.replace(folder / new.name)


def fold_constant_transposes(model: Any) -> int:
    """Replace Transpose nodes of an initializer with the transposed initializer; return how many.

    Exporters share tied input and output embeddings through such a node; folded, the output
    projection is a MatMul with a constant weight that the quantizer can quantize.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or len(node.input) != 1 or node.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        array = np.ascontiguousarray(
            np.transpose(numpy_helper.to_array(initializers[node.input[0]]), perm)
        )
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        graph.node.remove(node)
        folded += 1
    return folded


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


def require_kind(artifact: Artifact, kind: str, strategy: str, wanted: str) -> None:
    if artifact.manifest.kind != kind:
        raise InvalidInput(
            "artifact", [f"{artifact.id} is {artifact.manifest.kind}; {strategy} takes {wanted}"]
        )


class OnnxExport:
    def apply(
        self, artifact: Artifact, options: ExportOptions, context: OptimizationContext
    ) -> Artifact:
        from optimum.exporters.onnx import main_export

        require_kind(artifact, "hf", "onnx-export", "a Hugging Face format artifact")
        context.progress(0.05, "exporting with optimum-onnx")
        with grouped_attention() if options.grouped_attention else contextlib.nullcontext():
            main_export(
                str(artifact.path),
                output=context.output_dir,
                task="text-generation-with-past",
                do_validation=False,
                opset=options.opset,
                trust_remote_code=False,
                library_name="transformers",
            )
        context.check_cancelled()
        fused = 0
        if options.fuse:
            context.progress(0.6, "fusing normalization and rotary-embedding operators")
            fused = fuse_graph(context.output_dir)
        context.progress(0.7, "comparing logits with the torch model")
        difference = max_logit_difference(artifact.path, context.output_dir, options.verify_prompts)
        if difference > options.max_logit_diff:
            raise GptstoreError(
                f"the exported model's logits differ from torch's by up to "
                f"{difference:.3g} (bound {options.max_logit_diff:g}); the "
                "export is discarded"
            )
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="onnx-export",
            options=unstructure(options),
            kind="onnx",
            metrics_after={"max_logit_diff": difference, "fused_operators": fused},
        )
        return Artifact(context.output_dir, manifest)


class OnnxQuantize:
    def apply(
        self, artifact: Artifact, options: QuantizeOptions, context: OptimizationContext
    ) -> Artifact:
        require_kind(artifact, "onnx", "onnx-quantize", "an ONNX artifact (run onnx-export first)")
        texts = list(context.data) or [default_text()]
        context.progress(0.05, "measuring the parent's perplexity")
        before = perplexity(artifact.path, texts)
        context.check_cancelled()
        context.progress(0.3, "quantizing weights to int8")
        for path in artifact.path.iterdir():
            if (
                path.is_file()
                and not path.name.startswith(MODEL_FILE)
                and path.name != "manifest.json"
            ):
                shutil.copy2(path, context.output_dir / path.name)
        quantize(artifact.path / MODEL_FILE, context.output_dir / MODEL_FILE, options)

        context.check_cancelled()
        context.progress(0.7, "measuring the quantized perplexity")
        after = perplexity(context.output_dir, texts)
        change = after / before - 1
        bound = options.max_perplexity_increase
        if bound is not None and change > bound:
            raise GptstoreError(
                f"int8 perplexity {after:.4g} is {change:+.1%} against "
                f"{before:.4g} (bound {bound:+.1%}); the result is discarded"
            )
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="onnx-quantize",
            options=unstructure(options),
            kind="onnx",
            data_digest=data_digest(list(context.data)) if context.data else "default-text",
            metrics_before={"perplexity": before},
            metrics_after={"perplexity": after, "perplexity_change": change},
        )
        return Artifact(context.output_dir, manifest)
