"""The ``onnx-export`` strategy: optimum-onnx's export with the KV cache, grouped-query
attention kept grouped, fused operators, and a gate on the logits' difference from torch."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

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
from gptstore_onnx.graph import fuse_graph
from gptstore_onnx.runner import OrtOptions, OrtRunner


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
    """

    verify_prompts: tuple[str, ...] = field(default=DEFAULT_PROMPTS, converter=str_tuple)
    max_logit_diff: float = 1e-3
    opset: int | None = None
    fuse: bool = True
    grouped_attention: bool = True


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


class OnnxExport:
    def __init__(self, options: ExportOptions | None = None) -> None:
        self.options = options or ExportOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        options = self.options
        from optimum.exporters.onnx import main_export

        require_kind(artifact, "hf", "onnx-export", "a Hugging Face format artifact")
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
        fused = 0
        if options.fuse:
            context.progress(0.6, "fusing normalization and rotary-embedding operators")
            fused = fuse_graph(context.output_dir)
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
            metrics_after={"max_logit_diff": difference, "fused_operators": fused},
        )
        return Artifact(context.output_dir, manifest)
