"""A lean decoder graph for Llama-family models, written from the weights with ``onnx.helper``.

optimum's export traces the model's Python: its dynamic shapes leave about 55 small nodes per
layer (Shape, Gather, Unsqueeze, Concat, Reshape...), and at batch 1 on a CPU those nodes, not the
weights, set the decode rate (docs/benchmarks.md: 1,789 nodes per step for SmolLM2). This graph
has 12 nodes per layer, ONNX Runtime's fused operators doing the work:

- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm, with the
  residual add);
- one ``MatMul`` for q, k and v, and one for the MLP's gate and up projections;
- ``RotaryEmbedding`` on q and k at the rows' own positions (``position_ids``);
- ``GroupQueryAttention`` without rotary: it appends the new keys and values to the cache (no
  repeated KV heads) and masks padding through ``attention_bias``, built once per step from the
  attention mask. Rows are left-padded, as gptstore's batches are: GQA's own rotary would take
  positions from the sequence lengths, which left padding breaks.

The inputs and outputs are those of the optimum export (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value`` in, ``logits`` and ``present.N.key/value``
out), so the onnx runner, its cache surgery for continuous batching and ``onnx-quantize`` serve it
unchanged; one more input, ``logits_to_keep`` ([1], int64), says of how many last positions the
logits are wanted (the runner asks for 1 when it generates).

Supported: Llama, Mistral (without a sliding window) and Qwen2 configurations with the default
rotary embedding; anything else is refused with the reason, and the optimum export
remains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptstore.plugin import InvalidInput

SUPPORTED = ("llama", "mistral", "qwen2")
#: What padding adds to a score: far below any real one, finite (no inf - inf in softmax).
MASKED = -3.0e38


def check_config(config: dict[str, Any]) -> list[str]:
    """Why the lean graph cannot represent a model of this configuration (empty: it can)."""
    problems = []
    if config.get("model_type") not in SUPPORTED:
        problems.append(
            f"model_type {config.get('model_type')!r} is not one of {', '.join(SUPPORTED)}"
        )
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        problems.append(f"rope_scaling {scaling} is not the default rotary embedding")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} is not silu")
    window = config.get("sliding_window")
    sliding = config.get("use_sliding_window", config.get("model_type") == "mistral")
    if sliding and window and window < int(config.get("max_position_embeddings", 0)):
        problems.append(f"sliding_window {window} is below the context")
    if config.get("mlp_bias"):
        problems.append("mlp_bias is set")
    return problems


def _weights(folder: Path) -> dict[str, Any]:
    import numpy as np
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name.removeprefix("model.")] = np.asarray(
                    handle.get_tensor(name), dtype=np.float32
                )
    return tensors


def rotary_caches(config: dict[str, Any], head_dim: int) -> tuple[Any, Any]:
    """cos and sin, [max_position_embeddings, head_dim / 2], of the default rotary embedding."""
    import numpy as np

    theta = float(config.get("rope_theta", 10000.0))
    inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(int(config["max_position_embeddings"]), dtype=np.float64)[:, None] * inverse
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build(folder: Path) -> Any:
    """The lean graph (an onnx ModelProto) of the Hugging Face model in ``folder``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    config = json.loads((folder / "config.json").read_text())
    problems = check_config(config)
    if problems:
        raise InvalidInput("lean graph", problems)
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-6))
    weights = _weights(folder)
    nodes: list[Any] = []
    initializers: list[Any] = []

    def const(name: str, value: Any) -> str:
        # (np.ascontiguousarray would make a scalar one-dimensional)
        initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> list[str]:
        domain = "com.microsoft" if op in MICROSOFT else ""
        nodes.append(
            helper.make_node(op, inputs, outputs, name=outputs[0] + "_node", domain=domain, **attrs)
        )
        return outputs

    def linear(x: str, names: list[str], out: str) -> str:
        """x @ W for the concatenated projections ``names`` (torch keeps them [out, in])."""
        matrix = np.concatenate([weights[f"{n}.weight"] for n in names], axis=0).T
        y = node("MatMul", [x, const(f"{out}.weight", matrix)], [out])[0]
        if all(f"{n}.bias" in weights for n in names):
            bias = np.concatenate([weights[f"{n}.bias"] for n in names])
            y = node("Add", [y, const(f"{out}.bias", bias)], [f"{out}.biased"])[0]
        return y

    # -- once per step: the padding mask as a bias, the sequence lengths GQA wants ------------
    shape = node("Shape", ["attention_mask"], ["mask_shape"])[0]
    batch = node("Gather", [shape, const("zero", np.array(0, np.int64))], ["batch"], axis=0)[0]
    total = node("Gather", [shape, const("one", np.array(1, np.int64))], ["total"], axis=0)[0]
    total32 = node("Cast", [total], ["total32"], to=TensorProto.INT32)[0]
    last = node("Sub", [total32, const("one32", np.array(1, np.int32))], ["last32"])[0]
    batch1 = node("Unsqueeze", [batch, const("axis0", np.array([0], np.int64))], ["batch1"])[0]
    node("Expand", [last, batch1], ["seqlens_k"])
    mask = node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)[0]
    free = node("Sub", [const("onef", np.array(1.0, np.float32)), mask], ["padding"])[0]
    pad = node("Mul", [free, const("masked", np.array(MASKED, np.float32))], ["pad_bias"])[0]
    pad4 = node("Unsqueeze", [pad, const("axes12", np.array([1, 2], np.int64))], ["pad4"])[0]
    ids_shape = node("Shape", ["input_ids"], ["ids_shape"])[0]
    steps = node("Gather", [ids_shape, "one"], ["steps"], axis=0)[0]
    bias_shape = node(
        "Concat",
        [
            batch1,
            const("one1", np.array([1], np.int64)),
            *[node("Unsqueeze", [v, "axis0"], [f"{v}1"])[0] for v in (steps, total)],
        ],
        ["bias_shape"],
        axis=0,
    )[0]
    node("Expand", [pad4, bias_shape], ["attention_bias"])
    cos, sin = rotary_caches(config, head_dim)
    const("cos_cache", cos)
    const("sin_cache", sin)

    # -- layers (sizes read from each layer's weights: pruning may change them) -------------
    embedding = weights["embed_tokens.weight"]
    x = node("Gather", [const("embed_tokens.weight", embedding), "input_ids"], ["embedded"])[0]
    residual = x
    for i in range(layers):
        p = f"layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        layer_heads = weights[f"{attn}.q_proj.weight"].shape[0] // head_dim
        layer_kv = weights[f"{attn}.k_proj.weight"].shape[0] // head_dim
        inner = weights[f"{mlp}.gate_proj.weight"].shape[0]
        gamma = const(f"{p}.input_layernorm.weight", weights[f"{p}.input_layernorm.weight"])
        if i == 0:
            h = node(
                "SimplifiedLayerNormalization",
                [x, gamma],
                [f"{p}.ln1"],
                epsilon=eps,
                axis=-1,
                stash_type=1,
            )[0]
        else:
            h, _, _, residual = node(
                "SkipSimplifiedLayerNormalization",
                [x, residual, gamma],
                [f"{p}.ln1", "", "", f"{p}.residual1"],
                epsilon=eps,
            )
        qkv = linear(h, [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], f"{p}.qkv")
        sizes = const(
            f"{p}.qkv_sizes",
            np.array([layer_heads * head_dim, layer_kv * head_dim, layer_kv * head_dim], np.int64),
        )
        q, k, v = node("Split", [qkv, sizes], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1)
        q, k = (
            node(
                "RotaryEmbedding",
                [x, "position_ids", "cos_cache", "sin_cache"],
                [f"{x}_rot"],
                num_heads=count,
                interleaved=0,
            )[0]
            for x, count in ((q, layer_heads), (k, layer_kv))
        )
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        context = node(
            "GroupQueryAttention",
            [q, k, v, *past, "seqlens_k", total32, "", "", "", "attention_bias"],
            [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
            num_heads=layer_heads,
            kv_num_heads=layer_kv,
            scale=float(head_dim) ** -0.5,
            do_rotary=0,
        )[0]
        out = linear(context, [f"{attn}.o_proj"], f"{p}.o")
        gamma = const(
            f"{p}.post_attention_layernorm.weight", weights[f"{p}.post_attention_layernorm.weight"]
        )
        h, _, _, residual = node(
            "SkipSimplifiedLayerNormalization",
            [out, residual, gamma],
            [f"{p}.ln2", "", "", f"{p}.residual2"],
            epsilon=eps,
        )
        gate_up = linear(h, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], f"{p}.gate_up")
        halves = const(f"{p}.gate_up_sizes", np.array([inner, inner], np.int64))
        gate, up = node("Split", [gate_up, halves], [f"{p}.gate", f"{p}.up"], axis=-1)
        sigmoid = node("Sigmoid", [gate], [f"{p}.sigmoid"])[0]
        silu = node("Mul", [gate, sigmoid], [f"{p}.silu"])[0]
        product = node("Mul", [silu, up], [f"{p}.swiglu"])[0]
        x = linear(product, [f"{mlp}.down_proj"], f"{p}.down")
    gamma = const("norm.weight", weights["norm.weight"])
    h, _, _, _ = node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, gamma],
        ["final_norm", "", "", ""],
        epsilon=eps,
    )
    # Logits of the last ``logits_to_keep`` positions only: a prompt's step needs its last
    # position's, and all of them over a 49k vocabulary cost time and memory (batch 8 x 2,048
    # tokens of SmolLM2: 3.2 GB).
    # A required input: ONNX Runtime cannot bind an input with a default (an initializer of
    # the same name) through IOBinding, which the shared KV buffer needs.
    start = node("Neg", ["logits_to_keep"], ["keep_from"])[0]
    kept = node(
        "Slice",
        [h, start, const("to_end", np.array([2**62], np.int64)), const("axis1", np.array([1]))],
        ["kept_positions"],
    )[0]
    head = weights.get("lm_head.weight", embedding)
    node("MatMul", [kept, const("lm_head.weight", head.T)], ["logits"])

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", i64, ["batch_size", "past_sequence_length + sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("logits_to_keep", i64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", f32, ["batch_size", "sequence_length", int(embedding.shape[0])]
        )
    ]
    for i in range(layers):
        layer_kv = weights[f"layers.{i}.self_attn.k_proj.weight"].shape[0] // head_dim
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}",
                    f32,
                    ["batch_size", layer_kv, "past_sequence_length", head_dim],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}",
                    f32,
                    ["batch_size", layer_kv, "past_sequence_length + sequence_length", head_dim],
                )
            )
    graph = helper.make_graph(nodes, "gptstore-lean", inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 9  # what ONNX Runtime 1.2x reads
    return model


#: ONNX Runtime's operators of the com.microsoft domain (SimplifiedLayerNormalization is in
#: ONNX Runtime's default domain).
MICROSOFT = {
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "GroupQueryAttention",
}
#: ONNX Runtime's fused operators the graph uses (what ``fused_operators`` counts).
FUSED = MICROSOFT | {"SimplifiedLayerNormalization"}
