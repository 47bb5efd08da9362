"""The data gptstore passes around: model cards, requirements, scores, artifacts and lineage.

All records are attrs classes, frozen where they are values. They cross process and HTTP
boundaries through the one converter in :mod:`gptstore.converter`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from attrs import Factory, define, field, frozen

from gptstore.converter import FieldProblem, at_least, in_range
from gptstore.errors import Cancelled, InvalidInput
from gptstore.units import DTYPE_ALIASES, DTYPE_BYTES, format_count, normalize_dtype

# Metrics where lower is better are kept on the card but never read as "quality".
_LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "wer", "cer", "error", "bpb", "bits_per_byte")


def _key(value: Any) -> str:
    return str(value).strip().lower()


def _optional_key(value: Any) -> str | None:
    return str(value).strip().lower() or None if value else None


def _optional_text(value: Any) -> str | None:
    return str(value).strip() or None if value else None


def _no_progress(_fraction: float, _message: str) -> None:
    return None


def str_tuple(value: Any) -> tuple[str, ...]:
    """An attrs converter: ``"a"`` -> ``("a",)``, ``["a", "b"]`` -> ``("a", "b")``, None -> ()."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _lower_tuple(value: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip().lower() for v in str_tuple(value) if v.strip()))


# ---------------------------------------------------------------------------------------------
# model cards


@frozen(kw_only=True)
class Metric:
    """One evaluation result of a model.

    :param name: what was measured, usually the benchmark (``mmlu``, ``hellaswag``, ``wikitext``).
    :param value: the value as reported (accuracy may be 0-1 or 0-100).
    :param kind: the metric type (``acc``, ``acc_norm``, ``perplexity``).
    :param origin: ``reported`` by the model's author, or ``measured`` here by gptstore.
    """

    name: str = field(converter=_key)
    value: float = field(converter=float)
    kind: str | None = None
    dataset: str | None = None
    origin: Literal["reported", "measured"] = "reported"

    @property
    def higher_is_better(self) -> bool:
        text = f"{self.name} {self.kind or ''}".lower()
        return not any(word in text for word in _LOWER_IS_BETTER)

    @property
    def normalized(self) -> float | None:
        """The value on a 0-1 scale where 1 is best, or None when it has no such reading.

        Accuracy-like metrics reported as 0-1 or 0-100 both map to 0-1; metrics where lower is
        better (perplexity, loss) have none.
        """
        # A figure measured here (perplexity, tokens/s, bytes) is raw, not an accuracy.
        if not self.higher_is_better or self.value < 0 or self.origin == "measured":
            return None
        if self.value <= 1:
            return self.value
        if self.value <= 100:
            return self.value / 100
        return None


@frozen(kw_only=True)
class ModelCard:
    """What the catalog knows about one model from one source.

    ``parameters`` and ``dtype`` come from safetensors headers, never from loading weights.
    ``popularity`` is the source's download count (0 when it has none).
    """

    source: str
    model_id: str
    revision: str | None = None
    name: str = field(default=Factory(lambda self: self.model_id, takes_self=True))
    description: str = ""
    architecture: str | None = None
    parameters: int | None = None
    dtype: str | None = None
    size_bytes: int | None = None
    context_length: int | None = None
    tasks: tuple[str, ...] = field(default=(), converter=_lower_tuple)
    languages: tuple[str, ...] = field(default=(), converter=_lower_tuple)
    license: str | None = field(default=None, converter=_optional_key)
    tags: tuple[str, ...] = field(default=(), converter=str_tuple)
    base_model: str | None = None
    metrics: tuple[Metric, ...] = field(default=())
    popularity: int = 0
    likes: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    location: str | None = None

    @metrics.validator
    def _unique_metrics(self, _attribute: Any, metrics: tuple[Metric, ...]) -> None:
        # One value per name: filters, rankings and explanations must all read the same one.
        names = [m.name for m in metrics]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"metric(s) {', '.join(repeated)} appear more than once; give each "
                "result its own name (e.g. mmlu/acc_norm)"
            )

    @property
    def uid(self) -> str:
        """``source:model_id``, unique in a catalog."""
        return f"{self.source}:{self.model_id}"

    @property
    def dtype_bytes(self) -> float | None:
        if self.dtype is None:
            return None
        try:
            return DTYPE_BYTES[normalize_dtype(self.dtype)]
        except InvalidInput:
            return None

    @property
    def quality(self) -> float | None:
        """Mean of the card's normalized higher-is-better metrics, None when it reports none."""
        values = [m.normalized for m in self.metrics if m.normalized is not None]
        return sum(values) / len(values) if values else None

    def metric(self, name: str) -> Metric | None:
        name = name.strip().lower()
        return next((m for m in self.metrics if m.name == name), None)


# ---------------------------------------------------------------------------------------------
# requirements and scores


def _check_floor(instance: Any, _attribute: Any, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(
            f"metric floor for {instance.name} must lie in 0..1 (got {value}); "
            "accuracy-like metrics are compared on a 0-1 scale"
        )


_check_floor.json_schema = {"minimum": 0, "maximum": 1}  # type: ignore[attr-defined]


@frozen
class MetricFloor:
    """``name`` must be reported with a normalized value of at least ``minimum`` (0-1)."""

    name: str = field(converter=_key)
    minimum: float = field(converter=float, validator=_check_floor)


def _check_measured_name(_instance: Any, _attribute: Any, value: str) -> None:
    figure, at, backend = value.partition("@")
    if not (figure and at and backend):
        raise ValueError(
            f"measured figure {value!r} must be named FIGURE@BACKEND, as gptstore eval records "
            "it: perplexity@onnx, decode_tokens_per_s@torch, time_to_first_token_s@onnx"
        )


_check_measured_name.json_schema = {"pattern": "^[^@]+@[^@]+$"}  # type: ignore[attr-defined]

#: The largest bound a measured figure may be given (finite; NaN and infinities are refused).
MAX_MEASURE = 1e300


@frozen(kw_only=True)
class MeasuredBound:
    """A figure ``gptstore eval`` measured on this host (``perplexity@onnx``,
    ``decode_tokens_per_s@torch``) must lie within bounds: a perplexity ceiling, a speed floor.
    A card without that figure fails it."""

    name: str = field(converter=_key, validator=_check_measured_name)
    at_most: float | None = field(default=None, validator=in_range(0, MAX_MEASURE))
    at_least: float | None = field(default=None, validator=in_range(0, MAX_MEASURE))

    def __attrs_post_init__(self) -> None:
        if self.at_most is None and self.at_least is None:
            raise InvalidInput("requirement", [f"measured bound on {self.name} has no bound"])
        if self.at_most is not None and self.at_least is not None and self.at_least > self.at_most:
            raise InvalidInput(
                "requirement",
                [
                    f"measured bound on {self.name}: at_least {self.at_least:g} > at_most "
                    f"{self.at_most:g}"
                ],
            )

    def holds(self, value: float) -> bool:
        return (self.at_most is None or value <= self.at_most) and (
            self.at_least is None or value >= self.at_least
        )

    def describe(self) -> str:
        parts = [f"<= {self.at_most:g}"] if self.at_most is not None else []
        parts += [f">= {self.at_least:g}"] if self.at_least is not None else []
        return " and ".join(parts)


#: The most metric floors, and the most measured bounds, one requirement may hold.
MAX_BOUNDS = 32


def _few(most: int) -> Any:
    def check(_instance: Any, attribute: Any, value: tuple[Any, ...]) -> None:
        if len(value) > most:
            raise FieldProblem(
                attribute.name, f"{attribute.name} holds at most {most} entries, got {len(value)}"
            )

    check.json_schema = {"maxItems": most}  # type: ignore[attr-defined]
    return check


def _optional_dtype(value: str | None) -> str | None:
    return normalize_dtype(value) if value else None


#: The largest integer a requirement may hold (SQLite's integers are signed 64-bit).
MAX_INT = 2**63 - 1

#: How a requirement's dtype may be written (canonical names and their aliases).
DTYPE_NAMES = sorted({*DTYPE_BYTES, *DTYPE_ALIASES})


@frozen(kw_only=True)
class Requirement:
    """What a user needs. Every set field is a hard constraint; unset fields do not filter.

    :param memory_budget: bytes the weights may take; computed at ``dtype`` when set, else at the
        card's own dtype (float32 when unknown).
    :param languages: every one of these must be listed by the card.
    :param licenses: an allowlist; the card's license must be one of them.
    :param metric_floors: reported accuracy-like metrics, on a 0-1 scale.
    :param measured: bounds on figures measured on this host (``gptstore eval``), which only the
        ``store`` source's cards carry.
    :param query: free text that must match the card's name, description or tags.
    """

    task: str | None = field(default=None, converter=_optional_key)
    min_params: int | None = field(default=None, validator=in_range(1, MAX_INT))
    max_params: int | None = field(default=None, validator=in_range(1, MAX_INT))
    licenses: tuple[str, ...] = field(default=(), converter=_lower_tuple)
    languages: tuple[str, ...] = field(default=(), converter=_lower_tuple)
    min_context: int | None = field(default=None, validator=in_range(1, MAX_INT))
    memory_budget: int | None = field(default=None, validator=in_range(1, MAX_INT))
    dtype: str | None = field(
        default=None,
        converter=_optional_dtype,
        metadata={"json_schema": {"enum": [*DTYPE_NAMES, None]}},
    )
    metric_floors: tuple[MetricFloor, ...] = field(default=(), validator=_few(MAX_BOUNDS))
    measured: tuple[MeasuredBound, ...] = field(default=(), validator=_few(MAX_BOUNDS))
    sources: tuple[str, ...] = field(default=(), converter=_lower_tuple)
    query: str | None = field(default=None, converter=_optional_text)
    include_delisted: bool = False

    def __attrs_post_init__(self) -> None:
        if self.min_params and self.max_params and self.min_params > self.max_params:
            raise InvalidInput(
                "requirement",
                [
                    f"min_params {format_count(self.min_params)} is above max_params "
                    f"{format_count(self.max_params)}"
                ],
            )


@frozen
class Criterion:
    """One line of a score breakdown: a 0-1 ``value``, its ``weight`` and a readable ``detail``."""

    name: str
    value: float
    weight: float
    detail: str


@frozen
class Score:
    """A policy's verdict on one card: ``total`` (higher ranks first) and why."""

    total: float
    breakdown: tuple[Criterion, ...] = ()


# ---------------------------------------------------------------------------------------------
# sources


@frozen(kw_only=True)
class SearchQuery:
    """What to ask a source for. Unset fields do not filter; ``limit`` bounds the answer."""

    text: str | None = None
    task: str | None = None
    limit: int | None = None


@frozen
class SourceStatus:
    """Whether a source can answer now (``online``) and a line saying how it is set up."""

    online: bool
    message: str


# ---------------------------------------------------------------------------------------------
# artifacts and lineage


@frozen
class RecipeStep:
    """The optimization step that made an artifact: strategy name and its structured options."""

    strategy: str
    options: dict[str, Any] = Factory(dict)
    #: The digest of the data gptstore handed the strategy, ``"none"`` when it gave none (the
    #: strategy's default); None in manifests from before gptstore recorded it.
    data: str | None = None


@frozen(kw_only=True)
class GateCheck:
    """A quality gate a recipe checked on an artifact (kept in its manifest when it passed).

    :param metric: the figure: ``perplexity@torch`` (measured here by ``gptstore eval``) or a
        figure the step recorded (``heldout_perplexity``).
    :param baseline: the value it was compared with for a relative gate, and ``baseline_of``
        the artifact that value belongs to.
    :param bound: the bound, as written (``at most +5% over smollm2``).
    """

    metric: str
    value: float
    bound: str
    passed: bool
    baseline: float | None = None
    baseline_of: str | None = None
    recipe: str | None = None


@frozen(kw_only=True)
class Measurement:
    """A figure measured on this host by ``gptstore eval``, never mixed up with a card's
    self-reported metrics.

    :param name: ``perplexity`` (lower is better), ``decode_tokens_per_s``,
        ``time_to_first_token_s`` or ``resident_bytes`` (after loading).
    :param backend: the serving backend it was measured on.
    :param data: for perplexity, the dataset's origin and digest (``origin@sha256``).
    :param host: the machine (CPU, cores, memory), for speed and memory figures.
    """

    name: str
    value: float
    backend: str
    data: str | None = None
    host: str = ""
    measured_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What a newer measurement replaces: the same figure, backend and data."""
        return (self.name, self.backend, self.data)


_KIND = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _check_kind(_instance: Any, _attribute: Any, kind: str) -> None:
    if not _KIND.match(kind):
        raise ValueError(f"artifact kind {kind!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-'")


@frozen(kw_only=True)
class Manifest:
    """Lineage of an artifact, stored as ``manifest.json`` in its folder.

    :param kind: what the folder holds: ``hf`` (a Hugging Face model folder), ``onnx``,
        ``adapter`` (weights applied on the parent, such as a PEFT adapter), or a kind a strategy
        names (1-64 characters of a-z, 0-9, ``.``, ``_``, ``-``).
    :param parent: id of the artifact this one was derived from (None for an imported model).
    :param origin: the catalog card it descends from (``source:model_id@revision``).
    :param files: relative path -> sha256 of every file in the artifact.
    :param measured: figures ``gptstore eval`` measured on this host (see :class:`Measurement`).
    :param gates: the quality gates a recipe checked on it (see :class:`GateCheck`).
    """

    id: str
    kind: str = field(default="hf", validator=_check_kind)
    parent: str | None = None
    origin: str | None = None
    step: RecipeStep | None = None
    data_digest: str | None = None
    metrics_before: dict[str, float] = Factory(dict)
    metrics_after: dict[str, float] = Factory(dict)
    files: dict[str, str] = Factory(dict)
    library_versions: dict[str, str] = Factory(dict)
    created_at: datetime | None = None
    measured: tuple[Measurement, ...] = ()
    gates: tuple[GateCheck, ...] = ()


@frozen
class Artifact:
    """A model folder on disk (HF format or ONNX) with its manifest."""

    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.manifest.id


@frozen
class ToolCall:
    """A function call the model made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@frozen
class ChatMessage:
    """One message of a chat. An assistant's may carry the tool calls it made; a ``tool``
    message answers one of them (``tool_call_id``)."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


#: One example of a dataset: a text, or a conversation to render with a model's chat template.
Example = str | tuple[ChatMessage, ...]


@frozen
class Dataset:
    """Training, calibration or evaluation data, and where it came from.

    :param examples: texts, and conversations a strategy renders with its model's template.
    :param digest: sha256 of the examples (None for an empty dataset); manifests record it.
    :param origin: where the examples were read (a file path, or the name of a built-in corpus).
    """

    examples: tuple[Example, ...] = ()
    digest: str | None = None
    origin: str = ""

    def __bool__(self) -> bool:
        return bool(self.examples)

    def texts(
        self, chat_prompt: Callable[[tuple[ChatMessage, ...]], str] | None = None
    ) -> list[str]:
        """Every example as text; conversations rendered with ``chat_prompt`` (a runner's, or a
        tokenizer's chat template). InvalidInput when there are conversations and no renderer."""
        texts = []
        for index, example in enumerate(self.examples):
            if isinstance(example, str):
                texts.append(example)
            elif chat_prompt is None:
                raise InvalidInput(
                    f"data from {self.origin or 'the dataset'}",
                    [f"example {index} is a conversation and this step has no chat template"],
                )
            else:
                texts.append(chat_prompt(example))
        return texts


@define(kw_only=True)
class OptimizationContext:
    """What an optimization strategy gets besides the artifact and its options.

    :param output_dir: an empty folder to write the new artifact's files into; the core moves it
        into the store atomically once ``apply`` returns.
    :param data: training or calibration examples (empty when the user gave none: a strategy
        that needs data falls back to a corpus it names, or refuses).
    :param progress: called with (fraction done 0-1, message).
    :param cancel_event: set when the job is cancelled; call :meth:`check_cancelled` often.
    """

    output_dir: Path
    data: Dataset = Factory(Dataset)
    progress: Callable[[float, str], None] = _no_progress
    cancel_event: threading.Event = Factory(threading.Event)

    def check_cancelled(self) -> None:
        """Raise :class:`~gptstore.errors.Cancelled` when the job was cancelled."""
        if self.cancel_event.is_set():
            raise Cancelled("optimization cancelled")


# ---------------------------------------------------------------------------------------------
# serving


@frozen(kw_only=True)
class GenerationRequest:
    """One prompt to complete. ``temperature`` 0 means greedy decoding."""

    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    #: Subtracted from a token's logit once if it occurs in the completion so far (OpenAI's
    #: presence_penalty), and once per occurrence (frequency_penalty).
    presence_penalty: float = field(default=0.0, validator=in_range(-2, 2))
    frequency_penalty: float = field(default=0.0, validator=in_range(-2, 2))
    #: (token id, bias) pairs added to the logits before picking (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: A grammar the completion must follow (structured outputs, tool calls).
    constraint: Constraint | None = None
    #: The LoRA adapter (its artifact id, one of the deployment's ``adapters``) this row is
    #: decoded with; None: the base model.
    adapter: str | None = None


@frozen(kw_only=True)
class Constraint:
    """A grammar a completion must follow, applied as a mask over the logits at every step.

    :param kind: ``json_schema``: ``source`` is a JSON Schema as JSON text (``{"type":
        "object"}`` for OpenAI's json_object); ``lark``: a grammar in llguidance's Lark syntax
        (which may embed JSON schemas with ``%json``); ``regex``: a regular expression the whole
        completion matches.
    """

    kind: Literal["json_schema", "lark", "regex"]
    source: str


@frozen
class TokenLogprob:
    """A token, its log-probability, and (when asked) the most likely alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@frozen(kw_only=True)
class Generation:
    """A completed generation. ``finish_reason`` is ``stop`` or ``length``."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    logprobs: tuple[TokenLogprob, ...] | None = None


@frozen
class TextLogprobs:
    """Log-probability of each token of a given text under the model (the first has none)."""

    tokens: tuple[str, ...]
    logprobs: tuple[float | None, ...]


@frozen
class RunnerHealth:
    ok: bool
    message: str = ""


@frozen(kw_only=True)
class RunnerInfo:
    """What a loaded model can do, declared by its runner and enforced by the core before a
    request reaches the runner.

    :param context_length: tokens of prompt plus completion the model takes (None: unknown, not
        checked).
    :param logprobs: whether ``generate`` and ``stream`` return token log-probabilities when a
        request asks for them; when False, such a request is refused with a 400.
    :param penalties: whether the runner applies ``presence_penalty``, ``frequency_penalty`` and
        ``logit_bias``; when False, a request that sets them is refused with a 400.
    :param constraints: whether the runner follows a request's ``constraint`` (structured
        outputs, tool calls); when False, such a request is refused with a 400. Runners on the
        shared decode loop (:class:`~gptstore.serving.decoding.DecodingRunner`) do all three.
    :param adapters: whether the runner decodes rows with LoRA adapters on its base model
        (``GenerationRequest.adapter``), rows of different adapters in one batch; when False, a
        deployment that declares adapters is refused.
    """

    context_length: int | None = field(default=None, validator=at_least(1))
    logprobs: bool = False
    penalties: bool = False
    constraints: bool = False
    adapters: bool = False
