"""The ``onnx-export`` strategy: the lean graph written from the weights (Llama-family models),
or optimum-onnx's export with the KV cache, grouped-query attention kept grouped and fused
operators; either way a gate on the logits' difference from torch."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    Gate,
    InvalidInput,
    OptimizationContext,
    derive_manifest,
    str_tuple,
    unstructure,
)
from gptstore_onnx.attention import grouped_attention
from gptstore_onnx.builder import FUSED, build, check_config
from gptstore_onnx.graph import fuse_graph, save_model
from gptstore_onnx.runner import MODEL_FILE, OrtOptions, OrtRunner


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what exporting and quantizing print: pages of TracerWarnings that tracing a
    KV-cache model always raises (the result is checked against the torch logits after), a log
    line per quantized node, and the deprecation notes of transformers and optimum. The steps
    report one progress line per stage instead; a failure still raises."""
    import logging
    import warnings

    loggers = [
        logging.getLogger(name) for name in ("transformers", "optimum", "torch.onnx", "onnxruntime")
    ]
    levels = [logger.level for logger in loggers]
    try:
        from transformers.utils import logging as hf_logging

        hf_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging, hf_level = None, None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
            if hf_logging is not None:
                hf_logging.set_verbosity(hf_level)


DEFAULT_PROMPTS = ("Hello, my name is", "The capital of France is", "def fibonacci(n):\n    return")


@frozen(kw_only=True)
class ExportOptions:
    """:param max_logit_diff: the largest |logit(onnx) - logit(torch)| allowed on the prompts.
    :param fuse: fuse RMSNorm, residual-add + RMSNorm and rotary-embedding subgraphs into ONNX
        Runtime's fused operators, and join the projections of one input into one MatMul, before
        verification (fewer, larger operators per token).
    :param grouped_attention: export grouped-query attention without repeating the key/value
        heads at every step (see ``gptstore_onnx.attention``).
    :param graph: ``lean``: the graph written from the weights with ONNX Runtime's fused
        decoder operators (``gptstore_onnx.builder``: Llama, Mistral and Qwen2 models, a fraction
        of optimum's nodes per step); ``optimum``: optimum-onnx's traced export (any causal LM
        it supports), with ``fuse`` and ``grouped_attention``; ``auto`` (default): ``lean``
        where the model's configuration allows it, else ``optimum``. ``fuse``, ``opset`` and
        ``grouped_attention`` apply to ``optimum`` only.
    """

    verify_prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, converter=str_tuple)
    max_logit_diff: float = 1e-3
    opset: int | None = None
    fuse: bool = True
    grouped_attention: bool = True
    graph: Literal["auto", "lean", "optimum"] = "auto"


def require_kind(artifact: Artifact, kind: str, strategy: str, wanted: str) -> None:
    if artifact.manifest.kind != kind:
        raise InvalidInput(
            "artifact", [f"{artifact.id} is {artifact.manifest.kind}; {strategy} takes {wanted}"]
        )


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


def graph_nodes(folder: Path) -> int:
    """How many nodes the exported graph runs per step."""
    import onnx

    return len(onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph.node)


class OnnxExport:
    def __init__(self, options: ExportOptions | None = None) -> None:
        self.options = options or ExportOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options
        from optimum.exporters.onnx import main_export

        require_kind(artifact, "hf", "onnx-export", "a Hugging Face format artifact")
        config = json.loads((artifact.path / "config.json").read_text())
        unsupported = check_config(config)
        if options.graph == "lean" and unsupported:
            raise InvalidInput("onnx-export", [f"graph = lean: {p}" for p in unsupported])
        fused = 0
        if options.graph == "optimum" or unsupported:
            context.progress(0.05, "exporting with optimum-onnx")
            grouped = grouped_attention() if options.grouped_attention else contextlib.nullcontext()
            with grouped, quiet():
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
            if options.fuse:
                context.progress(0.6, "fusing normalization and rotary-embedding operators")
                fused = fuse_graph(context.output_dir)
        else:
            context.progress(0.05, "writing the lean graph from the weights")
            for path in artifact.path.iterdir():
                if (
                    path.is_file()
                    and path.suffix != ".safetensors"
                    and path.name != "manifest.json"
                ):
                    shutil.copy2(path, context.output_dir / path.name)
            lean = build(artifact.path)
            fused = sum(n.op_type in FUSED for n in lean.graph.node)
            save_model(lean, context.output_dir)
            context.check_cancelled()
        context.progress(0.7, "comparing logits with the torch model")
        difference = max_logit_difference(artifact.path, context.output_dir, options.verify_prompts)
        Gate(metric="max logit difference from torch", at_most=options.max_logit_diff).check(
            difference
        )
        context.progress(1.0, "done")
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="onnx-export",
            options=unstructure(options),
            kind="onnx",
            metrics_after={
                "max_logit_diff": difference,
                "fused_operators": fused,
                "graph_nodes": graph_nodes(context.output_dir),
            },
        )
        return Artifact(context.output_dir, manifest)
