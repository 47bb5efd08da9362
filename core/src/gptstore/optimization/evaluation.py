"""Measurements of a loaded model through its runner, whatever the backend."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gptstore.errors import InvalidInput
from gptstore.protocols import Runner


def perplexity(runner: Runner, texts: Sequence[str]) -> float:
    """exp of the mean negative log-probability of every token after each text's first, from
    the runner's ``logprobs``."""
    scores = [v for r in runner.logprobs(list(texts)) for v in r.logprobs if v is not None]
    if not scores:
        raise InvalidInput("data", ["the texts have no tokens to measure perplexity on"])
    return math.exp(-sum(scores) / len(scores))
