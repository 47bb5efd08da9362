"""The PyTorch eager runner: transformers' model forward inside gptstore's shared decode loop
(:class:`gptstore.plugin.DecodingRunner`), one forward pass per generated token for the whole
batch."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Literal

from attrs import frozen

from gptstore.plugin import (
    Artifact,
    ArtifactStore,
    Decoder,
    DecodingRunner,
    NotFound,
    RefusedModel,
    serving_tokenizer,
    weight_files,
)


@frozen(kw_only=True)
class TorchOptions:
    """Options of a deployment on the ``torch`` backend."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    threads: int | None = None


class TorchBackend:
    def __init__(self, options: TorchOptions | None = None) -> None:
        self.options = options or TorchOptions()

    def load(self, artifact: Artifact) -> TorchRunner:
        """An HF-format artifact, or a PEFT adapter artifact served on top of its parent (the
        base model), without merging."""
        options = self.options
        if not (artifact.path / "adapter_config.json").is_file():
            return TorchRunner(artifact.path, options)
        base = ArtifactStore.of(artifact).parent(artifact)
        if base is None or not (base.path / "config.json").is_file():
            raise NotFound(
                f"adapter {artifact.id} needs its base model: its parent "
                f"{base.id if base else '(none recorded)'} is not a Hugging Face model folder"
            )
        return TorchRunner(base.path, options, adapter=artifact.path)


class TorchRunner(DecodingRunner):
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
        tokenizer = serving_tokenizer(adapter if adapter is not None and has_tokenizer else folder)
        super().__init__(
            Decoder(
                tokenizer,
                self.model.generation_config.eos_token_id,
                int(getattr(self.model.config, "max_position_embeddings", 0) or 0),
            )
        )

    def _model(
        self, ids: Any, mask: Any, positions: Any, past: Any, *, last: bool
    ) -> tuple[Any, Any]:
        import torch

        # Inference mode per call: torch's grad mode is per thread, and a runner may be called
        # from any thread.
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

    def _step(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=True)

    def _forward_all(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=False)

    def _describe(self) -> str:
        return f"torch {self.device.type} {str(self.dtype).removeprefix('torch.')}"

    def _release(self) -> None:
        del self.model
        gc.collect()
