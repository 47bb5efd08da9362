"""Rewrites of an exported ONNX graph: ONNX Runtime's fused decoder operators, joined
projections, trimmed rotary tables, tied-embedding transposes folded for quantization, and saving
a model back into its folder."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gptstore_onnx.runner import MODEL_FILE


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
