"""Measurements of a model on this host, through its runner, whatever the backend: held-out
perplexity from ``Runner.logprobs``, decode speed and time to first token from ``generate``,
and resident memory after loading. :func:`evaluate_artifact` records them in the artifact's
manifest as measured figures (``gptstore eval``)."""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import frozen

from gptstore.artifacts import ArtifactStore
from gptstore.errors import InvalidInput
from gptstore.manager import PluginManager
from gptstore.protocols import Runner
from gptstore.serving.deployments import load_runner, plan
from gptstore.types import Artifact, ChatMessage, Dataset, GenerationRequest, Measurement

#: The prompt decode speed is measured with (greedy, batch 1).
SPEED_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _fitting(runner: Runner, text: str, limit: int | None) -> list[str]:
    """``text`` cut at whitespace into pieces that each fit the model's context."""
    if limit is None or runner.count_tokens(text) <= limit:
        return [text]
    middle = len(text) // 2
    cut = text.rfind(" ", 0, middle)
    cut = cut if cut > 0 else middle
    if cut == 0 or cut >= len(text):
        raise InvalidInput("data", [f"a piece of {len(text)} characters does not fit the context"])
    return _fitting(runner, text[:cut], limit) + _fitting(runner, text[cut:], limit)


def perplexity(runner: Runner, texts: Sequence[str]) -> float:
    """exp of the mean negative log-probability of every token after each text's first, from
    the runner's ``logprobs``; texts longer than the model's context are scored in pieces."""
    limit = runner.info().context_length
    pieces = [piece for text in texts if text.strip() for piece in _fitting(runner, text, limit)]
    scores = [v for r in runner.logprobs(pieces) for v in r.logprobs if v is not None]
    if not scores:
        raise InvalidInput("data", ["the texts have no tokens to measure perplexity on"])
    return math.exp(-sum(scores) / len(scores))


def _timed(runner: Runner, prompt: str, max_new_tokens: int) -> tuple[float, float] | None:
    """(tokens/s after the first, time to first token) for ``prompt``; None when the model
    ends its answer before a second token."""
    first = GenerationRequest(prompt=prompt, max_tokens=1)
    runner.generate([first])  # warm-up: first calls allocate
    started = time.perf_counter()
    runner.generate([first])
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    [whole] = runner.generate([GenerationRequest(prompt=prompt, max_tokens=max_new_tokens)])
    elapsed = time.perf_counter() - started
    after_first = whole.completion_tokens - 1
    if after_first < 1:
        return None
    return after_first / max(elapsed - ttft, 1e-9), ttft


def decode_speed(runner: Runner, max_new_tokens: int = 32) -> tuple[float, float]:
    """(decode tokens per second, time to first token in seconds), greedy at batch 1: a one
    token generation times the prompt and first token; a longer one, the tokens after it. The
    prompt is :data:`SPEED_PROMPT` as a chat (an instruct model answers it at length), else as
    plain text."""
    for prompt in (runner.chat_prompt([ChatMessage("user", SPEED_PROMPT)]), SPEED_PROMPT):
        timed = _timed(runner, prompt, max_new_tokens)
        if timed is not None:
            return timed
    raise InvalidInput("model", ["it ended its answer at once; no decode speed to measure"])


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def host_description() -> str:
    """The machine speed figures belong to: CPU model, cores, memory, OS."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {total / 2**30:.0f} GiB"
    return f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} {platform.machine()}"


@frozen
class Evaluation:
    """An artifact as measured: its manifest now holds ``measurements``."""

    artifact: Artifact
    measurements: tuple[Measurement, ...]


def evaluate_artifact(
    manager: PluginManager,
    artifacts: ArtifactStore,
    artifact_id: str,
    backend: str,
    options: Mapping[str, Any] | None,
    data: Dataset,
    *,
    max_new_tokens: int = 32,
) -> Evaluation:
    """Load ``artifact_id`` on ``backend`` (as a deployment would be), measure it, and record
    the figures in its manifest."""
    if not data:
        raise InvalidInput("data", ["no examples to measure perplexity on"])
    checked = plan(manager, artifacts, artifact_id, backend, options, where="--option")
    before = resident_bytes()
    runner = load_runner(checked)
    try:
        loaded = resident_bytes()
        ppl = perplexity(runner, data.texts(runner.chat_prompt))
        if not math.isfinite(ppl):
            raise InvalidInput(
                "model",
                [f"its perplexity is {ppl}: the log-probabilities are not finite numbers"],
            )
        tokens_per_s, ttft = decode_speed(runner, max_new_tokens)
    finally:
        runner.close()
    host, now, name = host_description(), datetime.now(UTC), checked.backend.name
    measurements = (
        Measurement(
            name="perplexity",
            value=ppl,
            backend=name,
            data=f"{data.origin}@{data.digest}",
            measured_at=now,
        ),
        Measurement(
            name="decode_tokens_per_s", value=tokens_per_s, backend=name, host=host, measured_at=now
        ),
        Measurement(
            name="time_to_first_token_s", value=ttft, backend=name, host=host, measured_at=now
        ),
        Measurement(
            name="resident_bytes",
            value=float(max(loaded - before, 0)),
            backend=name,
            host=host,
            measured_at=now,
        ),
    )
    return Evaluation(artifacts.record(checked.artifact, list(measurements)), measurements)
