"""The PyTorch eager runner: transformers' model forward inside gptstore's shared decode loop
(:mod:`gptstore.decoding`), one forward pass per generated token for the whole batch."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from attrs import frozen

from gptstore.decoding import Decoder, serving_tokenizer
from gptstore.errors import NotFound, RefusedModel, Unavailable
from gptstore.modelfiles import weight_files
from gptstore.protocols import StreamChunk
from gptstore.types import (
    Artifact,
    ChatMessage,
    Generation,
    GenerationRequest,
    RunnerHealth,
    TextLogprobs,
)


@frozen(kw_only=True)
class TorchOptions:
    """Options of a deployment on the ``torch`` backend."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    threads: int | None = None


class TorchBackend:
    def load(self, artifact: Artifact, options: TorchOptions | None) -> TorchRunner:
        """An HF-format artifact, or a PEFT adapter artifact served on top of its parent (the
        base model), without merging."""
        if not (artifact.path / "adapter_config.json").is_file():
            return TorchRunner(artifact.path, options or TorchOptions())
        parent = artifact.manifest.parent
        base = artifact.path.parent / parent if parent else None
        if base is None or not (base / "config.json").is_file():
            raise NotFound(
                f"adapter {artifact.id} needs its base model: parent artifact "
                f"{parent or '(none recorded)'} is not in {artifact.path.parent}"
            )
        return TorchRunner(base, options or TorchOptions(), adapter=artifact.path)


class TorchRunner:
    """A loaded model. Batches run one at a time (a lock)."""

    def __init__(self, folder: Path, options: TorchOptions, adapter: Path | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if not weight_files(folder):
            raise RefusedModel(
                f"{folder}: no *.safetensors weights; gptstore serves safetensors only"
            )
        if options.threads:
            torch.set_num_threads(options.threads)
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, options.dtype)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=self.dtype,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
            )
            .to(self.device)
            .eval()
        )
        if adapter is not None:
            from peft import PeftModel

            if not (adapter / "adapter_model.safetensors").is_file():
                raise RefusedModel(
                    f"{adapter}: no adapter_model.safetensors; gptstore loads safetensors only"
                )
            self.model = PeftModel.from_pretrained(self.model, adapter, is_trainable=False).eval()
        has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
        self.tokenizer = tokenizer = serving_tokenizer(
            adapter if adapter is not None and has_tokenizer else folder
        )
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.decoder = Decoder(
            tokenizer,
            {t for t in [*eos, tokenizer.eos_token_id] if t is not None},
            int(getattr(self.model.config, "max_position_embeddings", 0) or 0),
        )
        self._lock = threading.Lock()
        self._closed = False

    def _model(
        self, ids: Any, mask: Any, positions: Any, past: Any, *, last: bool
    ) -> tuple[Any, Any]:
        import torch

        if self._closed:
            raise Unavailable("this model has been unloaded")
        # Inference mode per call: a stream is advanced from whichever worker thread the server
        # picks, and torch's grad mode is per thread.
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                position_ids=torch.from_numpy(positions).to(self.device),
                past_key_values=past,
                use_cache=True,
            )
            # Decoding needs only the last position: slice before copying out of torch.
            logits = out.logits[:, -1, :] if last else out.logits
            return logits.float().cpu().numpy(), out.past_key_values

    def _forward(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=True)

    def _forward_all(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=False)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        with self._lock:
            return self.decoder.generate(requests, self._forward)

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        with self._lock:
            yield from self.decoder.stream(request, self._forward)

    # -- scoring given text ----------------------------------------------------------------------

    def logprobs(self, texts: Sequence[str]) -> list[TextLogprobs]:
        with self._lock:
            return self.decoder.score(texts, self._forward_all)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return self.decoder.chat_prompt(messages)

    def health(self) -> RunnerHealth:
        if self._closed:
            return RunnerHealth(False, "closed")
        return RunnerHealth(
            True, f"torch {self.device.type} {str(self.dtype).removeprefix('torch.')}"
        )

    def close(self) -> None:
        self._closed = True
        with self._lock:
            del self.model
            gc.collect()
