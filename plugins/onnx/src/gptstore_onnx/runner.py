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
    PluginError,
    serving_tokenizer,
    str_tuple,
)

MODEL_FILE = "model.onnx"
#: A shared cache buffer holds whole blocks of this many positions, and room for a quarter more
#: than it fills (at least a block) when it is made: a batch outgrows it rarely, and a row holds
#: at most a quarter and two blocks more than it needs (which the KV budget counts).
CACHE_BLOCK = 64
#: The lean graph's name (builder.py): its cache outputs are GroupQueryAttention's.
LEAN_GRAPH = "gptstore-lean"
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
    :param shared_cache: decode into one preallocated KV buffer per layer, bound as both the
        step's past input and its present output, so attention appends the step's keys and
        values in place instead of copying the whole cache into new arrays every token. Only a
        graph whose attention is ``GroupQueryAttention`` (the lean graph) can; None (default):
        on when the graph can, True: refuse a graph that cannot.
    """

    providers: tuple[str, ...] = field(default=(), converter=str_tuple)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    io_binding: bool | None = None
    shared_cache: bool | None = None


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
        self.keeps_logits = "logits_to_keep" in inputs  # the lean graph's
        first = inputs[self.past_names[0]] if self.past_names else None
        self.kv_shape = (int(first.shape[1]), int(first.shape[3])) if first is not None else None
        self.kv_dtype = "float16" if first is not None and "float16" in first.type else "float32"
        [logits] = [o for o in self.session.get_outputs() if o.name == "logits"]
        # Only the lean graph is read to check (a whole protobuf parse): no other graph shares
        # unless asked to. Buffers are numpy arrays: fp32 or fp16 caches and logits only.
        host_types = {"tensor(float)", "tensor(float16)"}
        wanted = options.shared_cache
        if wanted is None:
            wanted = self.session.get_modelmeta().graph_name == LEAN_GRAPH
        can_share = (
            wanted
            and first is not None
            and {first.type, logits.type} <= host_types
            and appends_in_place(model, self.present_names)
        )
        if options.shared_cache and not can_share:
            raise InvalidInput(
                "shared_cache",
                [
                    f"{model}'s cache outputs are not all written by GroupQueryAttention into "
                    "fp32 or fp16 tensors, which alone append to a shared buffer here; export "
                    'with `graph = "lean"` or leave shared_cache unset'
                ],
            )
        self.shared_cache = can_share if options.shared_cache is None else options.shared_cache
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        vocab = logits.shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else int(config.vocab_size)
        self.logits_dtype = "float16" if "float16" in logits.type else "float32"
        super().__init__(
            Decoder(
                serving_tokenizer(folder),
                getattr(config, "eos_token_id", None),
                int(getattr(config, "max_position_embeddings", 0) or 0),
            )
        )

    def forward(
        self, ids: Any, mask: Any, positions: Any, past: Any, keep: int | None = None
    ) -> tuple[Any, Any]:
        """The logits of a step and the new cache (``past`` None: an empty cache). ``keep``:
        the logits of that many last positions, where the graph can leave the others out
        (None: every position's)."""
        import numpy as np

        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.uses_positions:
            feeds["position_ids"] = positions
        if self.keeps_logits:
            feeds["logits_to_keep"] = np.array([keep or ids.shape[1]], dtype=np.int64)
        if self.shared_cache:
            return self._forward_shared(feeds, past)
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

    def _forward_shared(self, feeds: dict[str, Any], past: SharedCache | None) -> tuple[Any, Any]:
        """One step into the shared buffers: GroupQueryAttention writes the step's keys and
        values after the ``past.length`` filled positions, where the next step reads them."""
        import numpy as np
        import onnxruntime as ort

        batch, steps = feeds["input_ids"].shape
        total = feeds["attention_mask"].shape[1]
        if past is not None and past.length != total - steps:
            raise PluginError(
                f"the cache holds {past.length} positions but the attention mask covers "
                f"{total} with {steps} new"
            )
        if past is None:
            cache = self._shared([], batch, total)
        elif past.capacity < total:  # full: move to a larger buffer
            cache = self._shared(past.filled(), batch, total)
        else:
            cache = past
        binding = cache.binding  # the buffers stay bound from step to step
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        kept = min(int(feeds["logits_to_keep"][0]), steps) if self.keeps_logits else steps
        logits = np.empty((batch, kept, self.vocab_size), dtype=self.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits, SharedCache(cache.values, cache.arrays, total, binding)

    def _shared(self, filled: Sequence[Any], batch: int, length: int) -> SharedCache:
        """New buffers for ``batch`` rows with room past ``length`` positions, the first of
        them copied from ``filled`` (one array [batch, heads, positions, size] per buffer)."""
        import numpy as np
        import onnxruntime as ort

        assert self.kv_shape is not None
        heads, size = self.kv_shape
        capacity = self.kv_positions(length)
        arrays: list[Any] = []
        for index in range(len(self.past_names)):
            array: Any = np.zeros((batch, heads, capacity, size), dtype=self.kv_dtype)
            if filled:
                array[:, :, : filled[index].shape[2]] = filled[index]
            arrays.append(array)
        # On the CPU an OrtValue wraps its array (no copy); elsewhere it is copied to the device
        # and the host array is dropped. ONNX Runtime's CUDA GroupQueryAttention takes fp16 and
        # bf16 only: an fp32 graph's attention runs on the CPU, so its buffers stay there (on
        # the device they would be copied to the host and back, whole, every step).
        device = self.device if self.kv_dtype == "float16" else "cpu"
        values = [ort.OrtValue.ortvalue_from_numpy(a, device, 0) for a in arrays]
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # first: the outputs' order is the binding's
        for past_name, present_name, value in zip(
            self.past_names, self.present_names, values, strict=True
        ):
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        return SharedCache(values, arrays if device == "cpu" else None, length, binding)

    def _step(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        logits, present = self.forward(ids, mask, positions, past, keep=1)
        return logits[:, -1, :], present

    def _forward_all(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self.forward(ids, mask, positions, past)

    def _cache_select(self, state: Any, rows: Sequence[int], drop: int) -> Any:
        import numpy as np

        index = np.asarray(rows, dtype=np.int64)
        kept = [np.ascontiguousarray(x[index, :, drop:]) for x in _host(state)]
        return self._wrap(kept)

    def _cache_join(self, first: Any, first_pad: int, second: Any, second_pad: int) -> Any:
        import numpy as np

        joined = [
            np.concatenate([_left_pad(a, first_pad), _left_pad(b, second_pad)])
            for a, b in zip(_host(first), _host(second), strict=True)
        ]
        return self._wrap(joined)

    def _wrap(self, arrays: list[Any]) -> Any:
        """A cache made on the host, in the form the next step takes."""
        if not self.shared_cache:
            return arrays
        batch, _heads, length, _size = arrays[0].shape
        return self._shared(arrays, batch, length)

    def kv_positions(self, length: int) -> int:
        if not self.shared_cache:
            return length
        ahead = length + max(CACHE_BLOCK, length // 4)
        capacity = -(-ahead // CACHE_BLOCK) * CACHE_BLOCK
        if self.decoder.context_length:  # never more than the model can attend to
            capacity = max(length, min(capacity, self.decoder.context_length))
        return capacity

    def kv_bytes_per_token(self) -> int | None:
        if self.kv_shape is None:
            return None
        heads, size = self.kv_shape
        return len(self.past_names) * heads * size * (2 if self.kv_dtype == "float16" else 4)

    def _describe(self) -> str:
        if self.shared_cache:
            binding = " (shared KV buffer)"
        else:
            binding = " (IOBinding)" if self.io_binding else ""
        return "onnxruntime " + ", ".join(self.session.get_providers()) + binding

    def _release(self) -> None:
        del self.session


@frozen
class SharedCache:
    """The KV cache in shared buffers: one OrtValue [batch, heads, capacity, size] per past
    input, of which the first ``length`` positions are filled (``arrays``: the same memory as
    numpy arrays on the CPU, None on a device). A step writes into it: a state once passed to
    a step is that step's, and only the state it returns is read again."""

    values: list[Any]
    arrays: list[Any] | None
    length: int
    binding: Any  # an IOBinding with the buffers bound as past inputs and present outputs

    @property
    def capacity(self) -> int:
        return int(self.values[0].shape()[2])

    def filled(self) -> list[Any]:
        """The filled positions as numpy arrays (views on the CPU, copies from a device)."""
        if self.arrays is not None:
            return [a[:, :, : self.length] for a in self.arrays]
        return [v.numpy()[:, :, : self.length] for v in self.values]


def appends_in_place(model: Path, present_names: Sequence[str]) -> bool:
    """Whether every cache output of the graph in ``model`` is written by GroupQueryAttention,
    which appends to a buffer shared by its past input and present output."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    writers = {output: node.op_type for node in graph.node for output in node.output}
    return bool(present_names) and all(
        writers.get(name) == "GroupQueryAttention" for name in present_names
    )


def _host(state: Any) -> list[Any]:
    """The cache as numpy arrays [batch, heads, positions, size] (an IOBinding's OrtValues are
    copied to the host: rows join and leave far less often than tokens are decoded)."""
    import numpy as np

    if isinstance(state, SharedCache):
        return state.filled()
    return [x if isinstance(x, np.ndarray) else x.numpy() for x in state]


def _left_pad(x: Any, count: int) -> Any:
    import numpy as np

    return np.pad(x, ((0, 0), (0, 0), (count, 0), (0, 0))) if count else x
