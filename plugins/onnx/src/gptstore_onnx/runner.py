"""The ``onnx`` serving backend: an ONNX Runtime session in gptstore's shared decode loop."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import field, frozen

from gptstore.plugin import (
    Artifact,
    Decoder,
    DecodingRunner,
    InvalidInput,
    NotFound,
    serving_tokenizer,
    str_tuple,
)

MODEL_FILE = "model.onnx"
#: Providers whose outputs IOBinding can keep in CUDA memory between steps.
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@frozen(kw_only=True)
class OrtOptions:
    """Options of a deployment on the ``onnx`` backend.

    :param providers: execution providers in order of preference (default: CUDA when a GPU
        driver is present and onnxruntime has the provider, else CPU).
    :param io_binding: keep the KV cache where the provider computes, binding it from one step
        to the next instead of copying it through numpy each token. None (default): on when the
        first provider is CUDA's (or TensorRT's); on the CPU numpy arrays are already used in
        place, and other providers keep the cache in host memory when it is forced on.
    """

    providers: tuple[str, ...] = field(default=(), converter=str_tuple)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    io_binding: bool | None = None


def _cuda_usable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(requested: tuple[str, ...]) -> list[str]:
    """CUDA when a GPU driver is present and onnxruntime has the provider, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise InvalidInput(
                "providers",
                [
                    f"{', '.join(missing)} not available; this "
                    f"onnxruntime has {', '.join(available)}"
                ],
            )
        return list(requested)
    if "CUDAExecutionProvider" in available and _cuda_usable():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtBackend:
    def __init__(self, options: OrtOptions | None = None) -> None:
        self.options = options or OrtOptions()

    def load(self, artifact: Artifact) -> OrtRunner:
        return OrtRunner(artifact.path, self.options)


class OrtRunner(DecodingRunner):
    def __init__(self, folder: Path, options: OrtOptions) -> None:
        import onnxruntime as ort
        from transformers import AutoConfig

        model = folder / MODEL_FILE
        if not model.is_file():
            raise NotFound(
                f"{folder} has no {MODEL_FILE}; export it first with "
                "`gptstore optimize ARTIFACT onnx-export`"
            )
        settings = ort.SessionOptions()
        if options.intra_op_threads:
            settings.intra_op_num_threads = options.intra_op_threads
        if options.inter_op_threads:
            settings.inter_op_num_threads = options.inter_op_threads
        self.session = ort.InferenceSession(
            str(model), sess_options=settings, providers=choose_providers(options.providers)
        )
        on_gpu = self.session.get_providers()[0] in CUDA_PROVIDERS
        self.device = "cuda" if on_gpu else "cpu"  # where the bound cache lives
        self.io_binding = on_gpu if options.io_binding is None else options.io_binding
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.uses_positions = "position_ids" in inputs
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_shape = (int(first.shape[1]), int(first.shape[3])) if first is not None else None
        self.kv_dtype = "float16" if first is not None and "float16" in first.type else "float32"
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        super().__init__(
            Decoder(
                serving_tokenizer(folder),
                getattr(config, "eos_token_id", None),
                int(getattr(config, "max_position_embeddings", 0) or 0),
            )
        )

    def forward(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        """All logits of a step and the new cache (``past`` None: an empty cache)."""
        import numpy as np

        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.uses_positions:
            feeds["position_ids"] = positions
        if past is None and self.kv_shape is not None:
            heads, size = self.kv_shape
            empty = np.zeros((ids.shape[0], heads, 0, size), dtype=self.kv_dtype)
            past = [empty] * len(self.past_names)
        if self.io_binding:
            return self._forward_bound(feeds, past or [])
        feeds.update(zip(self.past_names, past or [], strict=True))
        outputs = self.session.run(["logits", *self.present_names], feeds)
        return outputs[0], outputs[1:]

    def _forward_bound(self, feeds: dict[str, Any], past: Sequence[Any]) -> tuple[Any, Any]:
        """One step through an IOBinding: logits come back to the host for sampling; the new
        cache stays on the provider's device as OrtValues, bound as the next step's past."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:  # the empty cache of a first step
                binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]

    def _step(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        logits, present = self.forward(ids, mask, positions, past)
        return logits[:, -1, :], present

    def _forward_all(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self.forward(ids, mask, positions, past)

    def _cache_select(self, state: Any, rows: Sequence[int], drop: int) -> Any:
        import numpy as np

        index = np.asarray(rows, dtype=np.int64)
        return [np.ascontiguousarray(x[index, :, drop:]) for x in _host(state)]

    def _cache_join(self, first: Any, first_pad: int, second: Any, second_pad: int) -> Any:
        import numpy as np

        return [
            np.concatenate([_left_pad(a, first_pad), _left_pad(b, second_pad)])
            for a, b in zip(_host(first), _host(second), strict=True)
        ]

    def kv_bytes_per_token(self) -> int | None:
        if self.kv_shape is None:
            return None
        heads, size = self.kv_shape
        return len(self.past_names) * heads * size * (2 if self.kv_dtype == "float16" else 4)

    def _describe(self) -> str:
        binding = " (IOBinding)" if self.io_binding else ""
        return "onnxruntime " + ", ".join(self.session.get_providers()) + binding

    def _release(self) -> None:
        del self.session


def _host(state: Sequence[Any]) -> list[Any]:
    """The cache as numpy arrays [batch, heads, positions, size] (an IOBinding's OrtValues are
    copied to the host: rows join and leave far less often than tokens are decoded)."""
    import numpy as np

    return [x if isinstance(x, np.ndarray) else x.numpy() for x in state]


def _left_pad(x: Any, count: int) -> Any:
    import numpy as np

    return np.pad(x, ((0, 0), (0, 0), (count, 0), (0, 0))) if count else x
