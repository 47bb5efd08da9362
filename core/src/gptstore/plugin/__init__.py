"""The one import surface for plugins: every record, protocol, value type and helper a model
source, scoring policy, optimization strategy or serving backend needs.

.. code-block:: python

    from gptstore.plugin import hookimpl, ServingBackend, Runner, RunnerInfo, ...

Everything named in ``__all__`` is the plugin contract: it keeps its name and meaning within a
major version of gptstore (see docs/plugins/hooks.md). Import nothing else from gptstore in a
plugin: other modules are the core's own and may move.
"""

from __future__ import annotations

from pathlib import Path

from gptstore import hookimpl
from gptstore.artifacts import ArtifactStore, derive_manifest, hash_files, sha256_file
from gptstore.builtins.local import matches, matching, read_card
from gptstore.catalog.schema import RANK_COLUMNS, RANK_COLUMNS_VERSION
from gptstore.config import store_home
from gptstore.converter import FieldProblem, at_least, in_range, structure, unstructure
from gptstore.errors import (
    Cancelled,
    Conflict,
    ContextLengthExceeded,
    GptstoreError,
    InvalidInput,
    NotFound,
    PluginError,
    RefusedModel,
    Unavailable,
    UnknownName,
)
from gptstore.files import atomic_write
from gptstore.modelfiles import (
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    as_tuple,
    check_weights,
    context_length,
    count_parameters,
    parse_model_index,
    read_config,
    read_readme,
    readme_text,
    weight_files,
)
from gptstore.optimization.data import (
    DEFAULT_CORPUS,
    default_dataset,
    default_heldout,
    default_texts,
    load_dataset,
    split,
)
from gptstore.optimization.evaluation import perplexity
from gptstore.optimization.gates import Gate, GateFailed
from gptstore.optimization.models import chat_renderer, load_causal_lm, packed_ids
from gptstore.optimization.training import (
    LOG_FILE,
    TrainingOptions,
    block_perplexity,
    copy_readme,
    heldout_split,
    step_count,
    token_blocks,
    train_adapter,
    train_steps,
    training_metrics,
    training_texts,
    warmup_cosine,
)
from gptstore.protocols import (
    Backend,
    Optimizer,
    Refusal,
    Runner,
    Scorer,
    Source,
    SqlRankable,
    SqlRanking,
    StreamChunk,
)
from gptstore.records import ModelSource, OptimizationStrategy, ScoringPolicy, ServingBackend
from gptstore.serving.decoding import Decoder, DecodingRunner, serving_tokenizer
from gptstore.types import (
    Artifact,
    ChatMessage,
    Constraint,
    Criterion,
    Dataset,
    Example,
    GateCheck,
    Generation,
    GenerationRequest,
    Manifest,
    MeasuredBound,
    Measurement,
    Metric,
    MetricFloor,
    ModelCard,
    OptimizationContext,
    RecipeStep,
    Requirement,
    RunnerHealth,
    RunnerInfo,
    Score,
    SearchQuery,
    SourceStatus,
    TextLogprobs,
    TokenLogprob,
    ToolCall,
    str_tuple,
)
from gptstore.units import format_bytes, format_count, parse_bytes, parse_count


def cache_dir(name: str) -> Path:
    """A plugin's cache folder in the store home: ``$GPTSTORE_HOME/cache/NAME`` (not created)."""
    return store_home() / "cache" / name


__all__ = [
    "DEFAULT_CORPUS",
    "LOG_FILE",
    "PICKLE_SUFFIXES",
    "RANK_COLUMNS",
    "RANK_COLUMNS_VERSION",
    "SAFETENSORS_DTYPES",
    "Artifact",
    "ArtifactStore",
    "Backend",
    "Cancelled",
    "ChatMessage",
    "Conflict",
    "Constraint",
    "ContextLengthExceeded",
    "Criterion",
    "Dataset",
    "Decoder",
    "DecodingRunner",
    "Example",
    "FieldProblem",
    "Gate",
    "GateCheck",
    "GateFailed",
    "Generation",
    "GenerationRequest",
    "GptstoreError",
    "InvalidInput",
    "Manifest",
    "MeasuredBound",
    "Measurement",
    "Metric",
    "MetricFloor",
    "ModelCard",
    "ModelSource",
    "NotFound",
    "OptimizationContext",
    "OptimizationStrategy",
    "Optimizer",
    "PluginError",
    "RecipeStep",
    "Refusal",
    "RefusedModel",
    "Requirement",
    "Runner",
    "RunnerHealth",
    "RunnerInfo",
    "Score",
    "Scorer",
    "ScoringPolicy",
    "SearchQuery",
    "ServingBackend",
    "Source",
    "SourceStatus",
    "SqlRankable",
    "SqlRanking",
    "StreamChunk",
    "TextLogprobs",
    "TokenLogprob",
    "ToolCall",
    "TrainingOptions",
    "Unavailable",
    "UnknownName",
    "as_tuple",
    "at_least",
    "atomic_write",
    "block_perplexity",
    "cache_dir",
    "chat_renderer",
    "check_weights",
    "context_length",
    "copy_readme",
    "count_parameters",
    "default_dataset",
    "default_heldout",
    "default_texts",
    "derive_manifest",
    "format_bytes",
    "format_count",
    "hash_files",
    "heldout_split",
    "hookimpl",
    "in_range",
    "load_causal_lm",
    "load_dataset",
    "matches",
    "matching",
    "packed_ids",
    "parse_bytes",
    "parse_count",
    "parse_model_index",
    "perplexity",
    "read_card",
    "read_config",
    "read_readme",
    "readme_text",
    "serving_tokenizer",
    "sha256_file",
    "split",
    "step_count",
    "str_tuple",
    "structure",
    "token_blocks",
    "train_adapter",
    "train_steps",
    "training_metrics",
    "training_texts",
    "unstructure",
    "warmup_cosine",
    "weight_files",
]
