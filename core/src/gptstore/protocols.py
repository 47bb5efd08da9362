"""What the factories in registration records return.

These are structural (:class:`typing.Protocol`): a plugin implements the methods, it does not
inherit from anything in gptstore.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from attrs import frozen

from gptstore.types import (
    Artifact,
    ChatMessage,
    Generation,
    GenerationRequest,
    ModelCard,
    OptimizationContext,
    Requirement,
    RunnerHealth,
    RunnerInfo,
    Score,
    SearchQuery,
    SourceStatus,
    TextLogprobs,
    TokenLogprob,
)


@frozen
class Refusal:
    """Something a source found but will not offer, and why (``pickle weights only``)."""

    model_id: str
    reason: str


@runtime_checkable
class Source(Protocol):
    """A place models come from (a local folder, the Hugging Face hub)."""

    def search(self, query: SearchQuery) -> Iterable[ModelCard | Refusal]:
        """Cards matching ``query``; ``SearchQuery()`` lists what ``gptstore sync`` should hold.

        Yield a :class:`Refusal` for a model found but refused, so sync can report it.
        """
        ...

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        """Put the model's files, at ``revision`` exactly, in a new folder under ``dest``.

        :returns: that folder (HF format: config.json, *.safetensors, tokenizer files).
        """
        ...

    def status(self) -> SourceStatus:
        """Whether the source can answer now, and how it is set up."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """Scores cards that passed every hard constraint of a requirement."""

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        """Higher ``Score.total`` ranks first; ``breakdown`` says why."""
        ...


@frozen
class SqlRanking:
    """An SQL expression that computes the same total as ``Scorer.score``, for large catalogs.

    It may use the columns of the catalog's ``cards`` table as ``c.<column>`` (see
    docs/plugins/hooks.md) and ``?`` placeholders bound to ``params`` in order.
    """

    expression: str
    params: tuple[Any, ...] = ()


@runtime_checkable
class SqlRankable(Protocol):
    """Optional: a scorer that can also rank inside SQLite (no Python call per candidate)."""

    def rank_sql(self, requirement: Requirement) -> SqlRanking | None: ...


@runtime_checkable
class Optimizer(Protocol):
    """Derives a new artifact from an artifact (pruning, LoRA, export, quantization)."""

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        """Write the new model into ``context.output_dir`` and return it with its manifest.

        Report progress through ``context.progress`` and call ``context.check_cancelled()`` often.
        """
        ...


@frozen
class StreamChunk:
    """A piece of generated text; the last chunk of a stream has ``finish_reason`` set, and
    (where the runner counts them; the core counts them otherwise) the tokens of the prompt and
    of the completion."""

    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@runtime_checkable
class Runner(Protocol):
    """A loaded model that generates."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Complete a batch of prompts; the answer has one Generation per request, in order."""
        ...

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """Complete one prompt, yielding text as tokens are decoded."""
        ...

    def logprobs(self, texts: Sequence[str]) -> list[TextLogprobs]:
        """Log-probabilities of the tokens of given texts (evaluation, perplexity)."""
        ...

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Render chat messages with the model's chat template, ready for generation."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` takes as a prompt (the core checks it against the context)."""
        ...

    def info(self) -> RunnerInfo:
        """The model's context length and whether it returns log-probabilities."""
        ...

    def health(self) -> RunnerHealth: ...

    def close(self) -> None:
        """Release the model's memory; the runner is not used afterwards."""
        ...


@runtime_checkable
class Backend(Protocol):
    """Loads artifacts into runners (ONNX Runtime, PyTorch eager)."""

    def load(self, artifact: Artifact) -> Runner:
        """The artifact's model, loaded and ready to generate."""
        ...
