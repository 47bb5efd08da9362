"""Synthetic model cards with realistic spreads, for catalog benchmarks and property tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from gptstore.types import Metric, ModelCard

TASKS = (
    "text-generation",
    "text-generation",
    "text-generation",
    "text2text-generation",
    "fill-mask",
    "text-classification",
    "feature-extraction",
)
LICENSES = (
    "apache-2.0",
    "apache-2.0",
    "mit",
    "mit",
    "llama3.2",
    "gemma",
    "cc-by-nc-4.0",
    "other",
    "openrail",
)
LANGUAGES = ("en", "fr", "de", "es", "zh", "ja", "ar", "hi", "pt", "ru")
ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "GPT2LMHeadModel",
    "Phi3ForCausalLM",
    "BertForMaskedLM",
)
DTYPES = ("float32", "bfloat16", "bfloat16", "float16")
WORDS = (
    "chat",
    "instruct",
    "code",
    "math",
    "base",
    "tiny",
    "reasoning",
    "medical",
    "legal",
    "finance",
    "multilingual",
    "assistant",
    "summarization",
    "translation",
    "sql",
    "story",
    "roleplay",
    "distilled",
    "merged",
    "quantized",
)
METRICS = ("mmlu", "hellaswag", "arc", "gsm8k", "truthfulqa", "humaneval")
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


def synthetic_cards(count: int, *, seed: int = 0, source: str = "synthetic") -> Iterator[ModelCard]:
    """``count`` cards: log-uniform sizes 1M-100B, most with a few reported metrics."""
    rng = random.Random(seed)
    for index in range(count):
        words = rng.sample(WORDS, 3)
        parameters = int(10 ** rng.uniform(6, 11))
        metrics = tuple(
            Metric(name=name, value=round(rng.uniform(0.2, 0.9), 3))
            for name in rng.sample(METRICS, rng.randint(0, 3))
        )
        updated = EPOCH - timedelta(days=rng.uniform(0, 2000))
        yield ModelCard(
            source=source,
            model_id=f"org{index % 997}/{words[0]}-{words[1]}-{index}",
            revision=f"{rng.getrandbits(64):016x}",
            description=f"A {words[0]} {words[1]} model for {words[2]}.",
            architecture=rng.choice(ARCHITECTURES),
            parameters=parameters,
            dtype=rng.choice(DTYPES),
            context_length=rng.choice((512, 1024, 2048, 4096, 8192, 32768, 131072)),
            tasks=(rng.choice(TASKS),),
            languages=tuple(rng.sample(LANGUAGES, rng.randint(1, 3))),
            license=rng.choice(LICENSES),
            tags=tuple(words),
            metrics=metrics,
            popularity=int(10 ** rng.uniform(0, 7)),
            created_at=updated - timedelta(days=rng.uniform(0, 300)),
            updated_at=updated,
        )
