"""The PyTorch eager runner: transformers' model forward inside gptstore's shared decode loop
(:class:`gptstore.plugin.DecodingRunner`), one forward pass per generated token for the whole
batch.

PEFT adapters are served on their base model without merging. Adapters that change weights
(LoRA, DoRA...) run as peft's wrapper. Prompt tuning and p-tuning adapters do not: peft's forward
prepends the virtual tokens on every call (again on each cached decode step), drops the position
ids and returns logits for the virtual positions too. The runner instead computes the virtual
token embeddings once at load, and on the first step of a batch feeds the base model those
embeddings followed by the prompt's: the cache then holds them, every mask starts with them, every
position counts after them, and their logits are dropped. Generated text and log-probabilities are
then those of peft's own generate and forward for each prompt, batched or not."""

from __future__ import annotations

import gc
from collections.abc import Sequence
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
        #: A prompt-tuning adapter's virtual token embeddings, [1, tokens, hidden]; else None.
        self.prefix: Any = None
        #: Whether ``model`` is peft's wrapper of the deployment's adapters (rows pick theirs).
        self._multi = False
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
            self.prefix = _virtual_tokens(self.model, adapter)
            if self.prefix is not None:
                # peft's forward would prepend them again on every step: serve the base model.
                self.model = self.model.get_base_model().eval()
                self.prefix = self.prefix.to(self.device, self.dtype)
        has_tokenizer = adapter is not None and (adapter / "tokenizer_config.json").is_file()
        tokenizer = serving_tokenizer(adapter if adapter is not None and has_tokenizer else folder)
        context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        if context and self.prefix is not None:
            context = max(context - self.virtual_tokens, 1)  # the virtual tokens use positions
        super().__init__(Decoder(tokenizer, self.model.generation_config.eos_token_id, context))

    @property
    def virtual_tokens(self) -> int:
        """How many virtual tokens a prompt-tuning adapter puts before every prompt (else 0)."""
        return 0 if self.prefix is None else int(self.prefix.shape[1])

    def _load_adapter(self, name: str, folder: Path) -> None:
        """One more LoRA adapter on the base model (peft's multi-adapter model, decoded with
        each row's adapter in one batch: peft's mixed adapter batches)."""
        from peft import PeftModel

        if self.prefix is not None or (isinstance(self.model, PeftModel) and not self._multi):
            raise RefusedModel(
                "adapters are served on a base model; this deployment's artifact is an adapter"
            )
        if not (folder / "adapter_model.safetensors").is_file():
            raise RefusedModel(
                f"{folder}: no adapter_model.safetensors; gptstore loads safetensors only"
            )
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(folder, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, folder, adapter_name=name, is_trainable=False
            ).eval()
            self._multi = True

    def _unload_adapter(self, name: str) -> None:
        if len(self.model.peft_config) == 1:  # the last one: back to the plain base model
            self.model = self.model.unload().eval()
            self._multi = False
        else:
            self.model.delete_adapter(name)
        gc.collect()

    def _model(
        self,
        ids: Any,
        mask: Any,
        positions: Any,
        past: Any,
        *,
        last: bool,
        adapters: Sequence[str | None] | None = None,
    ) -> tuple[Any, Any]:
        import torch

        # Inference mode per call: torch's grad mode is per thread, and a runner may be called
        # from any thread.
        with torch.inference_mode():
            inputs = {
                "input_ids": torch.from_numpy(ids).to(self.device),
                "attention_mask": torch.from_numpy(mask).to(self.device),
                "position_ids": torch.from_numpy(positions).to(self.device),
            }
            if self.prefix is not None:
                inputs = self._with_virtual_tokens(inputs, first=past is None)
            if adapters is not None:  # each row with its adapter, "__base__" for none
                inputs["adapter_names"] = [a or "__base__" for a in adapters]
            elif self._multi:
                inputs["adapter_names"] = ["__base__"] * ids.shape[0]
            out = self.model(**inputs, past_key_values=past, use_cache=True)
            # Decoding needs only the last position: slice before copying out of torch.
            logits = out.logits[:, -1, :] if last else out.logits[:, -ids.shape[1] :, :]
            return logits.float().cpu().numpy(), out.past_key_values

    def _with_virtual_tokens(self, inputs: dict[str, Any], *, first: bool) -> dict[str, Any]:
        """The inputs of one step behind a prompt-tuning adapter's virtual tokens: every row's
        mask starts with them and its positions count after them; on the first step (empty
        cache) their embeddings come before the prompt's, and the cache holds them from then on.
        Rows are left-padded: a row reads [virtual tokens][padding, masked][its tokens], at the
        positions it would have alone (as peft's generate at batch 1)."""
        import torch

        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        rows, count = ids.shape[0], self.virtual_tokens
        mask = torch.cat([mask.new_ones(rows, count), mask], dim=1)
        positions = positions + count
        if not first:
            return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        embeds = self.model.get_input_embeddings()(ids)
        embeds = torch.cat([self.prefix.expand(rows, -1, -1).to(embeds.dtype), embeds], dim=1)
        ahead = torch.arange(count, device=positions.device).expand(rows, -1)
        positions = torch.cat([ahead, positions], dim=1)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}

    def _step(
        self,
        ids: Any,
        mask: Any,
        positions: Any,
        past: Any,
        adapters: Sequence[str | None] | None = None,
    ) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=True, adapters=adapters)

    def _forward_all(self, ids: Any, mask: Any, positions: Any, past: Any) -> tuple[Any, Any]:
        return self._model(ids, mask, positions, past, last=False)

    @property
    def continuous(self) -> bool:
        # A sliding-window layer's cache is not one row of positions per token: not joined.
        sliding = "sliding_attention" in (getattr(self.model.config, "layer_types", None) or ())
        return super().continuous and not sliding

    def _cache_select(self, state: Any, rows: Sequence[int], drop: int) -> Any:
        import torch
        from transformers import DynamicCache

        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        keep = self.virtual_tokens  # a prompt-tuning adapter's virtual tokens stay in front

        def cut(x: Any) -> Any:
            x = x.index_select(0, index)
            if not drop:
                return x
            return torch.cat([x[:, :, :keep], x[:, :, keep + drop :]], dim=2)

        return DynamicCache([(cut(k), cut(v)) for k, v in _cache_layers(state)])

    def _cache_join(self, first: Any, first_pad: int, second: Any, second_pad: int) -> Any:
        import torch
        from transformers import DynamicCache

        keep = self.virtual_tokens

        def pad(x: Any, count: int) -> Any:
            if not count:
                return x
            zeros = x.new_zeros((*x.shape[:2], count, x.shape[3]))
            return torch.cat([x[:, :, :keep], zeros, x[:, :, keep:]], dim=2)

        return DynamicCache(
            [
                (
                    torch.cat([pad(k1, first_pad), pad(k2, second_pad)]),
                    torch.cat([pad(v1, first_pad), pad(v2, second_pad)]),
                )
                for (k1, v1), (k2, v2) in zip(
                    _cache_layers(first), _cache_layers(second), strict=True
                )
            ]
        )

    def kv_bytes_per_token(self) -> int | None:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = self.dtype.itemsize if hasattr(self.dtype, "itemsize") else 4
        return int(2 * config.num_hidden_layers * heads * size * itemsize)

    def _describe(self) -> str:
        return f"torch {self.device.type} {str(self.dtype).removeprefix('torch.')}"

    def _release(self) -> None:
        del self.model
        gc.collect()


def _cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """A DynamicCache's (keys, values) per layer, each [batch, heads, positions, size]."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in cache]  # older transformers: a sequence of (keys, values)


#: The prompt-learning adapters whose virtual tokens are embeddings put before the input (peft's
#: forward concatenates ``get_prompt()`` to ``inputs_embeds``); the runner serves these.
PREFIXED_EMBEDDINGS = ("PROMPT_TUNING", "P_TUNING")


def _virtual_tokens(model: Any, adapter: Path) -> Any:
    """A prompt-tuning (or p-tuning) adapter's virtual token embeddings, [1, tokens, hidden],
    computed once; None for adapters that change weights. RefusedModel for the other prompt
    learning methods (prefix tuning writes the KV cache, multitask prompt tuning needs task
    ids): the decode loop would serve them wrongly."""
    import torch

    config = model.active_peft_config
    if not config.is_prompt_learning:
        return None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind not in PREFIXED_EMBEDDINGS:
        raise RefusedModel(
            f"{adapter}: a {kind} adapter; the torch backend serves prompt learning adapters of "
            f"{' and '.join(PREFIXED_EMBEDDINGS)} only (or adapters that change weights, as LoRA)"
        )
    with torch.no_grad():
        return model.get_prompt(batch_size=1).detach().clone()
