"""The PyTorch eager runner: a batched decode loop over the KV cache.

One forward pass per generated token for the whole batch (left-padded prompts, position ids from
the attention mask); each row then picks its own next token with its own sampling settings and
stops on its own (end-of-sequence token, a stop sequence, or max_tokens).
"""

from __future__ import annotations

import gc
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from attrs import define, field, frozen

from gptstore.errors import GptstoreError, InvalidInput, RefusedModel
from gptstore.modelfiles import weight_files
from gptstore.protocols import StreamChunk
from gptstore.types import (
    Artifact,
    ChatMessage,
    Generation,
    GenerationRequest,
    RunnerHealth,
    TextLogprobs,
    TokenLogprob,
)


@frozen(kw_only=True)
class TorchOptions:
    """Options of a deployment on the ``torch`` backend."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    threads: int | None = None


class TorchBackend:
    def load(self, artifact: Artifact, options: TorchOptions | None) -> TorchRunner:
        return TorchRunner(artifact.path, options or TorchOptions())


@define
class _Row:
    request: GenerationRequest
    prompt_tokens: int
    generator: Any
    tokens: list[int] = field(factory=list)
    logprobs: list[TokenLogprob] = field(factory=list)
    text: str = ""
    finish: Literal["stop", "length"] | None = None


def check_request(request: GenerationRequest) -> None:
    problems = []
    if not request.prompt:
        problems.append("the prompt is empty")
    if request.max_tokens < 1:
        problems.append(f"max_tokens must be at least 1, got {request.max_tokens}")
    if request.temperature < 0:
        problems.append(f"temperature must not be negative, got {request.temperature}")
    if not 0 < request.top_p <= 1:
        problems.append(f"top_p must lie in (0, 1], got {request.top_p}")
    if request.top_k < 0:
        problems.append(f"top_k must not be negative, got {request.top_k}")
    if problems:
        raise InvalidInput("generation request", problems)


class TorchRunner:
    """A loaded model. Batches are run one at a time (a lock), each with one decode loop."""

    def __init__(self, folder: Path, options: TorchOptions) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=False, local_files_only=True
        )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {t for t in [*eos, tokenizer.eos_token_id] if t is not None}
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._lock = threading.Lock()
        self._closed = False

    # -- generation ------------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        final = deque(self._decode(requests), maxlen=1)  # the rows after the last step
        rows: list[_Row] = final[0] if final else []
        return [
            Generation(
                text=r.text,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=len(r.tokens),
                finish_reason=r.finish or "length",
                logprobs=tuple(r.logprobs) if r.request.logprobs is not None else None,
            )
            for r in rows
        ]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        sent = ""
        stops = request.stop
        for rows in self._decode([request]):
            row = rows[0]
            if row.finish is not None:
                yield StreamChunk(
                    row.text[len(sent) :], row.finish, row.logprobs[-1] if row.logprobs else None
                )
                return
            # Hold back an incomplete character and anything that may start a stop sequence.
            safe = row.text.rstrip("\ufffd")
            hold = max(
                (n for s in stops for n in range(len(s) - 1, 0, -1) if safe.endswith(s[:n])),
                default=0,
            )
            safe = safe[: len(safe) - hold]
            if len(safe) > len(sent):
                yield StreamChunk(
                    safe[len(sent) :], None, row.logprobs[-1] if row.logprobs else None
                )
                sent = safe

    def _decode(self, requests: Sequence[GenerationRequest]) -> Iterator[list[_Row]]:
        """Run one batch; yield the rows after every step (the last yield has every row done)."""
        import torch

        if not requests:
            return
        for request in requests:
            check_request(request)
        if self._closed:
            raise GptstoreError("this runner is closed")
        with self._lock, torch.inference_mode():
            encoded = self.tokenizer(
                [r.prompt for r in requests], return_tensors="pt", padding=True
            )
            input_ids = encoded["input_ids"].to(self.device)
            attention = encoded["attention_mask"].to(self.device)
            lengths = attention.sum(dim=1).tolist()
            for request, length in zip(requests, lengths, strict=True):
                if self.context_length and length + request.max_tokens > self.context_length:
                    raise InvalidInput(
                        "generation request",
                        [
                            f"the prompt's {length} tokens plus max_tokens {request.max_tokens} "
                            f"exceed the model's context of {self.context_length} tokens"
                        ],
                    )
            rows = [
                _Row(r, int(n), _generator(r.seed)) for r, n in zip(requests, lengths, strict=True)
            ]
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            past = None
            current = input_ids
            for _step in range(max(r.max_tokens for r in requests)):
                out = self.model(
                    input_ids=current,
                    attention_mask=attention,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                chosen = []
                for index, row in enumerate(rows):
                    if row.finish is not None:
                        chosen.append(self.tokenizer.pad_token_id)
                        continue
                    token = _pick(logits[index], row.request, row.generator)
                    chosen.append(token)
                    self._advance(row, token, logprobs[index])
                yield rows
                if all(row.finish is not None for row in rows):
                    return
                current = torch.tensor(chosen, device=self.device).unsqueeze(1)
                attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1

    def _advance(self, row: _Row, token: int, logprobs: Any) -> None:
        request = row.request
        if request.logprobs is not None:
            top: tuple[tuple[str, float], ...] = ()
            if request.logprobs > 0:
                values, ids = logprobs.topk(request.logprobs)
                top = tuple(
                    (self.tokenizer.decode([i]), float(v))
                    for v, i in zip(values.tolist(), ids.tolist(), strict=True)
                )
            row.logprobs.append(
                TokenLogprob(self.tokenizer.decode([token]), float(logprobs[token]), top)
            )
        if token in self.eos:
            row.finish = "stop"
            return
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish = text[:cut], "stop"
            return
        row.text = text
        if len(row.tokens) >= request.max_tokens:
            row.finish = "length"

    # -- scoring given text ----------------------------------------------------------------------

    def logprobs(self, texts: Sequence[str]) -> list[TextLogprobs]:
        import torch

        results = []
        with self._lock, torch.inference_mode():
            for text in texts:
                ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(self.device)
                if ids.shape[1] == 0:
                    raise InvalidInput("text", ["empty text has no tokens to score"])
                if self.context_length and ids.shape[1] > self.context_length:
                    raise InvalidInput(
                        "text",
                        [
                            f"{ids.shape[1]} tokens exceed the model's "
                            f"context of {self.context_length}"
                        ],
                    )
                logits = self.model(input_ids=ids).logits[0].float()
                scores = torch.log_softmax(logits[:-1], dim=-1)
                picked = scores.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1).tolist()
                tokens = tuple(self.tokenizer.decode([t]) for t in ids[0].tolist())
                results.append(TextLogprobs(tokens, (None, *picked)))
        return results

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise GptstoreError("this model has no chat template; use completions instead")
        prompt: str = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return prompt

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


def _generator(seed: int | None) -> Any:
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _pick(logits: Any, request: GenerationRequest, generator: Any) -> int:
    """The next token of one row: greedy at temperature 0, else sampled with top-k and top-p."""
    import torch

    if request.temperature == 0:
        return int(logits.argmax())
    scores = logits / request.temperature
    if request.top_k > 0:
        kth = torch.topk(scores, min(request.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if request.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs > request.top_p  # keeps the token that crosses top_p
        scores = scores.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
