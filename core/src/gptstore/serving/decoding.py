"""A batched decode loop that serving backends share.

A backend supplies one forward step (token ids, attention mask and positions in; next-token
logits and its cache state out, as numpy arrays); the loop does the rest for every row of the
batch: greedy or sampled picking with the row's own settings and seed, end-of-sequence and stop
sequences, max_tokens, log-probabilities, and streaming that never shows text a stop sequence
may still remove.

numpy is imported when a loop runs: backends depend on it, the core does not.
"""

from __future__ import annotations

import copy
import functools
import importlib
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from attrs import define, field

from gptstore.errors import ContextLengthExceeded, GptstoreError, InvalidInput, Unavailable
from gptstore.protocols import StreamChunk
from gptstore.serving.grammar import Grammars, allowed
from gptstore.types import (
    ChatMessage,
    Generation,
    GenerationRequest,
    RunnerHealth,
    RunnerInfo,
    TextLogprobs,
    TokenLogprob,
)

#: forward(input_ids, attention_mask, position_ids, state) -> (logits, state). For decoding the
#: logits are the last position's, [batch, vocab]; for ``Decoder.score`` every position's,
#: [batch, tokens, vocab]. ``state`` is None on the first call (empty cache) and whatever the last
#: call returned after that (one new token per row).
Forward = Callable[[Any, Any, Any, Any], tuple[Any, Any]]

#: The most alternatives a request may ask for per token: each is a decoded string in the answer,
#: so an unbounded count lets one small request fill the server's memory (OpenAI allows 20).
MAX_LOGPROBS = 20


def check_request(request: GenerationRequest) -> None:
    """InvalidInput listing what is wrong with a request, whichever model it is for."""
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
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        problems.append(f"logprobs must lie in 0..{MAX_LOGPROBS}, got {request.logprobs}")
    if problems:
        raise InvalidInput("generation request", problems)


@define
class Row:
    """One request's progress through a batch."""

    request: GenerationRequest
    prompt_tokens: int
    rng: Any
    tokens: list[int] = field(factory=list)
    logprobs: list[TokenLogprob] = field(factory=list)
    text: str = ""
    finish: Literal["stop", "length"] | None = None
    #: llguidance's matcher of the request's constraint (None: unconstrained).
    matcher: Any = None
    #: How often each token occurs in the completion so far (for the penalties).
    counts: dict[int, int] = field(factory=dict)
    #: Incremental detokenizing: ``tokens[:read]`` decode to ``read_text``, whole characters;
    #: ``tokens[prefix:read]`` are decoded again with the new ones, for their context.
    prefix: int = 0
    read: int = 0
    read_text: str = ""


class Decoder:
    """The loop, for one tokenizer and model.

    ``eos_token_id``: the model config's end-of-sequence id or ids (the tokenizer's own is added);
    ``context_length``: the model's context in tokens (0: unknown, not checked).
    """

    def __init__(self, tokenizer: Any, eos_token_id: Any, context_length: int) -> None:
        configured = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        self.tokenizer = tokenizer
        self.eos_ids = {t for t in [*configured, tokenizer.eos_token_id] if t is not None}
        self.context_length = context_length
        self.vocab = len(tokenizer)
        self.grammars = Grammars(tokenizer, self.eos_ids)

    def row(self, request: GenerationRequest, prompt_tokens: int) -> Row:
        """A request's row, its grammar compiled (InvalidInput for a bad grammar or a
        logit_bias token the vocabulary does not have)."""
        outside = [t for t, _ in request.logit_bias if not 0 <= t < self.vocab]
        if outside:
            raise InvalidInput(
                "request",
                [
                    f"logit_bias names token {outside[0]}, which is not in the model's vocabulary "
                    f"of {self.vocab} tokens (ids 0..{self.vocab - 1}) @ $.logit_bias"
                ],
            )
        matcher = None if request.constraint is None else self.grammars.matcher(request.constraint)
        return Row(request, prompt_tokens, generator(request.seed), matcher=matcher)

    def choose(self, row: Row, logits: Any) -> int:
        """Pick ``row``'s next token from its ``logits`` (the model's, [vocab]) and add it to the
        row: the request's logit_bias and penalties, then its grammar's mask, then greedy or
        sampled picking. Log-probabilities are reported from the model's own logits."""
        import numpy as np

        request = row.request
        scores = logits
        if request.logit_bias or (
            row.counts and (request.presence_penalty or request.frequency_penalty)
        ):
            scores = logits.copy()
            for token, bias in request.logit_bias:
                scores[token] += bias
            if row.counts and (request.presence_penalty or request.frequency_penalty):
                ids = np.fromiter(row.counts, dtype=np.int64, count=len(row.counts))
                times = np.fromiter(row.counts.values(), dtype=np.float32, count=len(ids))
                scores[ids] -= times * request.frequency_penalty + request.presence_penalty
        if row.matcher is not None:
            permitted = allowed(row.matcher, self.vocab)
            if row.matcher.is_accepting():
                permitted[[t for t in self.eos_ids if t < self.vocab]] = True
            if not permitted.any():
                raise GptstoreError(f"the grammar allows no next token: {row.matcher.get_error()}")
            masked = np.full_like(scores, -np.inf)
            masked[: self.vocab][permitted] = scores[: self.vocab][permitted]
            scores = masked
        token = pick(scores, request, row.rng)
        self.advance(row, token, logits)
        if row.matcher is not None and row.finish is None:
            row.matcher.consume_token(token)
            if row.matcher.is_stopped():  # the grammar admits nothing more: done
                row.finish = "stop"
        if row.finish is None:
            row.counts[token] = row.counts.get(token, 0) + 1
        return token

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Messages rendered with the tokenizer's chat template, ready for generation."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise GptstoreError("this model has no chat template; use completions instead")
        prompt: str = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return prompt

    def token_ids(self, prompt: str) -> list[int]:
        """A prompt's token ids, as :meth:`encode` gives them in a batch (without padding)."""
        return [int(t) for t in self.tokenizer(prompt)["input_ids"]]

    def encode(self, prompts: Sequence[str]) -> tuple[Any, Any, list[int]]:
        """Left-padded int64 ids and attention mask, and each prompt's token count."""
        import numpy as np

        encoded = self.tokenizer(list(prompts), padding=True, return_tensors="np")
        ids = encoded["input_ids"].astype(np.int64)
        mask = encoded["attention_mask"].astype(np.int64)
        return ids, mask, [int(n) for n in mask.sum(axis=1)]

    def run(self, requests: Sequence[GenerationRequest], forward: Forward) -> Iterator[list[Row]]:
        """Decode a batch; yield the rows after each step (the last yield has all rows done)."""
        import numpy as np

        for request in requests:
            check_request(request)
        if not requests:
            return
        ids, mask, lengths = self.encode([r.prompt for r in requests])
        for request, length in zip(requests, lengths, strict=True):
            check_context(length, request.max_tokens, self.context_length)
        rows = [self.row(r, n) for r, n in zip(requests, lengths, strict=True)]
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        state = None
        pad = self.tokenizer.pad_token_id or 0
        for _step in range(max(r.max_tokens for r in requests)):
            logits, state = forward(ids, mask, positions, state)
            logits = np.asarray(logits, dtype=np.float32)
            chosen = []
            for index, row in enumerate(rows):
                if row.finish is not None:
                    chosen.append(pad)
                    continue
                chosen.append(self.choose(row, logits[index]))
            yield rows
            if all(row.finish is not None for row in rows):
                return
            ids = np.asarray(chosen, dtype=np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1

    def advance(self, row: Row, token: int, logits: Any) -> None:
        """Add ``token`` (picked from ``logits``) to ``row``: its log-probabilities, its text, and
        whether it is done (end of sequence, a stop sequence, max_tokens)."""
        request = row.request
        if request.logprobs is not None:
            logprobs = log_softmax(logits)
            top: tuple[tuple[str, float], ...] = ()
            if request.logprobs > 0:
                best = logprobs.argsort()[::-1][: request.logprobs]
                top = tuple((self.tokenizer.decode([int(i)]), float(logprobs[i])) for i in best)
            row.logprobs.append(
                TokenLogprob(self.tokenizer.decode([token]), float(logprobs[token]), top)
            )
        if token in self.eos_ids:
            row.finish = "stop"
            return
        row.tokens.append(token)
        before = row.read_text  # it holds no stop sequence, or the row would have stopped
        text = self.detokenize(row)
        settled = len(before) if text.startswith(before) else 0
        found = (text.find(s, max(0, settled - len(s) + 1)) for s in request.stop if s)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish = text[:cut], "stop"
            return
        row.text = text
        if len(row.tokens) >= request.max_tokens:
            row.finish = "length"

    def detokenize(self, row: Row) -> str:
        """The text of the row's tokens, decoding only the newest of them (vLLM's incremental
        detokenizing): the tokens since the last whole characters, after those before them for
        context. Decoding every token at every step costs time in the length of the answer.
        Gives what decoding every token gives, an incomplete last character as U+FFFD."""
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
        context = decode(row.tokens[row.prefix : row.read])
        window = decode(row.tokens[row.prefix :])
        # The context must show something: a decoder that strips the space starting a text
        # (SentencePiece's) would otherwise strip it from the new tokens. And where a
        # tokenizer's clean-up changed text across the window's start, decode it all.
        if window.startswith(context) and (context or not row.prefix):
            text: str = row.read_text + window[len(context) :]
        else:
            text = decode(row.tokens)
        if not text.endswith("\ufffd"):  # whole characters: the next window starts here
            row.prefix, row.read, row.read_text = row.read, len(row.tokens), text
        return text

    def score(self, texts: Sequence[str], forward: Forward) -> list[TextLogprobs]:
        """Log-probability of each token of each text given the ones before it (the first has
        none), from one forward pass over the whole text with an empty cache."""
        import numpy as np

        results = []
        for text in texts:
            ids = self.tokenizer(text, return_tensors="np")["input_ids"].astype(np.int64)
            if ids.shape[1] == 0:
                raise InvalidInput("text", ["empty text has no tokens to score"])
            if self.context_length and ids.shape[1] > self.context_length:
                raise InvalidInput(
                    "text",
                    [f"{ids.shape[1]} tokens exceed the model's context of {self.context_length}"],
                )
            mask = np.ones_like(ids)
            positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
            logits, _ = forward(ids, mask, positions, None)  # [1, tokens, vocab]
            picked = [
                float(log_softmax(np.asarray(logits[0, i], dtype=np.float32))[ids[0, i + 1]])
                for i in range(ids.shape[1] - 1)
            ]
            tokens = tuple(self.tokenizer.decode([int(t)]) for t in ids[0])
            results.append(TextLogprobs(tokens, (None, *picked)))
        return results

    def generate(self, requests: Sequence[GenerationRequest], forward: Forward) -> list[Generation]:
        final = deque(self.run(requests, forward), maxlen=1)  # the rows after the last step
        rows: list[Row] = final[0] if final else []
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

    def stream(self, request: GenerationRequest, forward: Forward) -> Iterator[StreamChunk]:
        sent = ""
        for rows in self.run([request], forward):
            row = rows[0]
            last = row.logprobs[-1] if row.logprobs else None
            if row.finish is not None:
                yield final_chunk(row, row.text[len(sent) :], last)
                return
            safe = visible_text(row)
            if len(safe) > len(sent):
                yield StreamChunk(safe[len(sent) :], None, last)
                sent = safe


def final_chunk(row: Row, text: str, logprob: TokenLogprob | None) -> StreamChunk:
    """A finished row's last chunk, with its token counts."""
    assert row.finish is not None
    return StreamChunk(
        text,
        row.finish,
        logprob,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=len(row.tokens),
    )


def visible_text(row: Row) -> str:
    """What of an unfinished row's text a stream may show: not an incomplete character at the
    end, nor the start of a stop sequence that the next tokens may complete (and remove)."""
    safe = row.text.rstrip("\ufffd")
    hold = max(
        (
            n
            for s in row.request.stop
            for n in range(min(len(s) - 1, len(safe)), 0, -1)
            if safe.endswith(s[:n])
        ),
        default=0,
    )
    return safe[: len(safe) - hold]


class DecodingRunner:
    """A :class:`~gptstore.protocols.Runner` over the shared :class:`Decoder`.

    A backend subclasses it and supplies ``_step`` (a forward step returning the last position's
    logits) and ``_forward_all`` (every position's, for scoring), ``_describe`` (its health
    message) and ``_release`` (free the model). Calls run one at a time (a lock); once closed, a
    runner refuses with :class:`~gptstore.errors.Unavailable`.
    """

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.tokenizer = decoder.tokenizer
        #: LoRA adapters this runner may load, by name; loaded ones in use order (last: most
        #: recent); at most ``_budget`` stay loaded once no row needs them.
        self._adapter_folders: dict[str, Path] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._pinned: set[str] = set()
        self._budget = 8
        # count_tokens runs on the server's event loop while a batch is being tokenized on the
        # worker thread; a fast tokenizer used from two threads at once fails ("Already
        # borrowed"), so counting has its own copy.
        self._counting_tokenizer = copy.deepcopy(decoder.tokenizer)
        self._lock = threading.Lock()
        self._closed = False

    def _step(self, ids: Any, mask: Any, positions: Any, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def _forward_all(self, ids: Any, mask: Any, positions: Any, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _cache_select(self, state: Any, rows: Sequence[int], drop: int) -> Any:
        """Continuous batching: the cache of ``rows`` only (indexes into the batch, in that
        order), without its first ``drop`` positions (padding that every kept row has)."""
        raise NotImplementedError

    def _cache_join(self, first: Any, first_pad: int, second: Any, second_pad: int) -> Any:
        """Continuous batching: one cache holding the rows of ``first`` then those of
        ``second``, each left-padded by its ``*_pad`` positions (which the mask hides)."""
        raise NotImplementedError

    def _load_adapter(self, name: str, folder: Path) -> None:
        """Load the LoRA adapter in ``folder`` as ``name`` next to the others (a backend that
        implements it and ``_unload_adapter`` serves a deployment's ``adapters``; its ``_step``
        then takes ``adapters``: each row's adapter name, or None for the base model)."""
        raise NotImplementedError

    def _unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    @property
    def adapters_supported(self) -> bool:
        cls = type(self)
        return (
            cls._load_adapter is not DecodingRunner._load_adapter
            and cls._unload_adapter is not DecodingRunner._unload_adapter
        )

    def set_adapters(self, folders: dict[str, Path], budget: int) -> None:
        """The adapters requests may name (loaded on first use), and how many stay loaded."""
        with self._lock:
            self._adapter_folders, self._budget = dict(folders), budget

    def loaded_adapters(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._loaded)

    def use_adapters(self, names: Iterable[str | None]) -> None:
        """Load what the next steps' rows need (those rows' adapters stay loaded until the next
        call), and unload the least recently used others past the budget."""
        with self._lock:
            self._check_open()
            self._pinned = {n for n in names if n}
            self._prepare(self._pinned)

    def _prepare(self, wanted: set[str]) -> None:
        unknown = sorted(n for n in wanted if n not in self._adapter_folders)
        if unknown:
            raise InvalidInput(
                "request",
                [f"adapter {unknown[0]!r} is not one of this deployment's adapters @ $.model"],
            )
        for name in sorted(wanted):
            if name in self._loaded:
                self._loaded.move_to_end(name)
            else:
                self._load_adapter(name, self._adapter_folders[name])
                self._loaded[name] = None
        while len(self._loaded) > self._budget:
            spare = next((n for n in self._loaded if n not in wanted | self._pinned), None)
            if spare is None:  # every loaded one is in use: over budget until rows finish
                return
            self._unload_adapter(spare)
            del self._loaded[spare]

    def _forward(self, requests: Sequence[GenerationRequest]) -> Forward:
        """The decode step of a batch of ``requests`` (with their rows' adapters)."""
        adapters = [r.adapter for r in requests]
        if not any(adapters):
            return self._step
        self._prepare({a for a in adapters if a})
        return functools.partial(self._adapter_step, adapters=adapters)

    def _adapter_step(
        self, ids: Any, mask: Any, positions: Any, state: Any, *, adapters: list[str | None]
    ) -> tuple[Any, Any]:
        step: Any = self._step
        return step(ids, mask, positions, state, adapters=adapters)  # type: ignore[no-any-return]

    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV cache one token of one row takes (None: unknown); the continuous
        batcher keeps its running batch under the deployment's KV budget with it."""
        return None

    def kv_positions(self, length: int) -> int:
        """Positions of cache a row holds once the batch's rows reach ``length``: more than
        ``length`` where the runner allocates ahead (the onnx runner's shared buffers)."""
        return length

    @property
    def continuous(self) -> bool:
        """Whether this runner's cache can take rows joining and leaving a running batch
        (it implements ``_cache_select`` and ``_cache_join``)."""
        cls = type(self)
        return (
            cls._cache_select is not DecodingRunner._cache_select
            and cls._cache_join is not DecodingRunner._cache_join
        )

    def forward_step(
        self,
        ids: Any,
        mask: Any,
        positions: Any,
        state: Any,
        adapters: Sequence[str | None] | None = None,
    ) -> tuple[Any, Any]:
        """One decode step (the last position's logits and the new cache), for a batcher that
        runs the loop itself, with each row's adapter (None: the base model); refuses once the
        runner is closed."""
        with self._lock:
            self._check_open()
            if adapters is None or not any(adapters):
                return self._step(ids, mask, positions, state)
            self._prepare({a for a in adapters if a})
            return self._adapter_step(ids, mask, positions, state, adapters=list(adapters))

    def cache_select(self, state: Any, rows: Sequence[int], drop: int) -> Any:
        with self._lock:
            self._check_open()
            return self._cache_select(state, rows, drop)

    def cache_join(self, first: Any, first_pad: int, second: Any, second_pad: int) -> Any:
        with self._lock:
            self._check_open()
            return self._cache_join(first, first_pad, second, second_pad)

    def _release(self) -> None:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        return len(self._counting_tokenizer(text)["input_ids"])

    def info(self) -> RunnerInfo:
        return RunnerInfo(
            context_length=self.decoder.context_length or None,
            logprobs=True,
            penalties=True,
            constraints=True,
            adapters=self.adapters_supported,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("this model has been unloaded")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        with self._lock:
            self._check_open()
            return self.decoder.generate(requests, self._forward(requests))

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        with self._lock:
            self._check_open()
            yield from self.decoder.stream(request, self._forward([request]))

    def logprobs(self, texts: Sequence[str]) -> list[TextLogprobs]:
        with self._lock:
            self._check_open()
            return self.decoder.score(texts, self._forward_all)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return self.decoder.chat_prompt(messages)

    def health(self) -> RunnerHealth:
        if self._closed:
            return RunnerHealth(False, "closed")
        return RunnerHealth(True, self._describe())

    def close(self) -> None:
        self._closed = True  # refuse new calls at once; the one running finishes first
        with self._lock:
            self._release()


def serving_tokenizer(folder: Path) -> Any:
    """A model folder's tokenizer set up for batches: left padding, a pad token (never remote
    code, never the hub)."""
    # transformers is the backends' dependency, not the core's: typed as Any here.
    transformers: Any = importlib.import_module("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, trust_remote_code=False, local_files_only=True
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_context(prompt_tokens: int, max_tokens: int, context_length: int | None) -> None:
    """ContextLengthExceeded when a prompt and its completion do not fit in the context."""
    if context_length and prompt_tokens + max_tokens > context_length:
        raise ContextLengthExceeded(
            "generation request",
            [
                f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} exceed "
                f"the model's context of {context_length} tokens; shorten the prompt or lower "
                "max_tokens"
            ],
        )


def generator(seed: int | None) -> Any:
    """A row's random generator; any integer seed works (a negative one wraps as 64 bits)."""
    import numpy as np

    return np.random.default_rng(None if seed is None else seed % 2**64)


def log_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def pick(logits: Any, request: GenerationRequest, rng: Any) -> int:
    """The next token of one row: greedy at temperature 0, else sampled with top-k and top-p."""
    import numpy as np

    if request.temperature == 0:
        return int(logits.argmax())
    # Shifted before dividing, so the best token scores 0 at any temperature: a tiny one sends
    # the others to -inf (greedy in effect) instead of overflowing into inf - inf = NaN.
    with np.errstate(over="ignore"):
        scores = (logits.astype(np.float64) - logits.max()) / request.temperature
    if request.top_k > 0 and request.top_k < scores.shape[-1]:
        kth = np.partition(scores, -request.top_k)[-request.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if request.top_p < 1.0:
        order = np.argsort(-scores)
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        drop = probs.cumsum() - probs > request.top_p  # keeps the token that crosses top_p
        scores = scores.copy()
        scores[order[drop]] = -np.inf
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
