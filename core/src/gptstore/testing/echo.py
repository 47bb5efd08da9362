"""An ``echo`` serving backend that needs no model: it answers with the prompt's words. For tests
of HTTP clients, of the server and of anything above a runner, where a real model only costs
time. Register it on a manager (``manager.register_plugin(gptstore.testing.echo, "echo")``) and
deploy any artifact on it: :func:`echo_artifact` makes one. Its ``echo-copy`` optimization
strategy copies an artifact in measured time, with progress and cancellation (tests of jobs).

A backend without weights (this one, or a remote engine) still deploys an artifact: the artifact
is its configuration (for a remote engine, the endpoint and model name in a file) and keeps its
lineage like any other.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from attrs import field, frozen

from gptstore import hookimpl
from gptstore.artifacts import ArtifactStore, derive_manifest, hash_files
from gptstore.converter import at_least, in_range
from gptstore.errors import RefusedModel
from gptstore.protocols import StreamChunk
from gptstore.records import OptimizationStrategy, ServingBackend
from gptstore.types import (
    Artifact,
    ChatMessage,
    Generation,
    GenerationRequest,
    Manifest,
    OptimizationContext,
    RunnerHealth,
    RunnerInfo,
    TextLogprobs,
)


@frozen(kw_only=True)
class EchoOptions:
    """:param context_length: tokens (words) of prompt plus completion it takes (None: no limit).
    :param uppercase: answer in capitals (so a test can tell two deployments apart).
    :param word_delay: seconds each answered word takes, so that requests stay in flight for a
        known time (load and reliability tests).
    :param load: ``error`` refuses to load (a RefusedModel); ``crash`` ends the loading process
        at once with status 70, as a native fault in a backend would; ``broken`` loads, and
        then fails every request (a model that cannot generate).
    :param load_delay: seconds loading takes (a swap or a delete during a slow load)."""

    context_length: int | None = field(default=None, validator=at_least(1))
    uppercase: bool = False
    word_delay: float = field(default=0.0, validator=in_range(0, 10))
    load: Literal["ok", "error", "crash", "broken"] = "ok"
    load_delay: float = field(default=0.0, validator=in_range(0, 600))


class EchoRunner:
    """Answers each request with the first ``max_tokens`` words of its prompt."""

    def __init__(self, options: EchoOptions) -> None:
        self.options = options
        self.closed = False

    def _words(self, request: GenerationRequest) -> list[str]:
        words = request.prompt.split()[: request.max_tokens]
        return [w.upper() for w in words] if self.options.uppercase else words

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        if self.options.load == "broken":
            raise RuntimeError("this echo model was told to fail every request")
        if self.options.word_delay:
            time.sleep(self.options.word_delay * max(len(self._words(r)) for r in requests))
        return [
            Generation(
                text=" ".join(self._words(r)),
                prompt_tokens=self.count_tokens(r.prompt),
                completion_tokens=len(self._words(r)),
                finish_reason="length",
            )
            for r in requests
        ]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        words = self._words(request)
        for i, word in enumerate(words):
            time.sleep(self.options.word_delay)
            yield StreamChunk(word if i == 0 else f" {word}")
        yield StreamChunk("", finish_reason="length")

    def logprobs(self, texts: Sequence[str]) -> list[TextLogprobs]:
        return [
            TextLogprobs(tuple(t.split()), (None,) + (0.0,) * (len(t.split()) - 1)) for t in texts
        ]

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return "\n".join(f"{m.role}: {m.content}" for m in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def info(self) -> RunnerInfo:
        return RunnerInfo(context_length=self.options.context_length, logprobs=False)

    def health(self) -> RunnerHealth:
        return RunnerHealth(not self.closed, "closed" if self.closed else "echo")

    def close(self) -> None:
        self.closed = True


class EchoBackend:
    def __init__(self, options: EchoOptions | None) -> None:
        self.options = options or EchoOptions()

    def load(self, artifact: Artifact) -> EchoRunner:
        time.sleep(self.options.load_delay)
        if self.options.load == "error":
            raise RefusedModel(f"{artifact.id}: the echo backend was told to refuse it")
        if self.options.load == "crash":
            os._exit(70)
        return EchoRunner(self.options)


@hookimpl
def gptstore_serving_backends() -> Iterator[ServingBackend]:
    yield ServingBackend(
        name="echo",
        factory=EchoBackend,
        options_type=EchoOptions,
        description="Answers with the prompt's words (no model; for tests)",
    )


def echo_artifact(artifacts: Path, artifact_id: str = "echo") -> Artifact:
    """An artifact in the store folder ``artifacts`` to deploy on the echo backend."""
    store = ArtifactStore(artifacts)
    staging = store.staging_dir()
    try:
        folder = staging / "echo"
        folder.mkdir()
        (folder / "echo.json").write_text(json.dumps({"backend": "echo"}))
        return store.commit(folder, Manifest(id=artifact_id, files=hash_files(folder)))
    finally:
        store.discard(staging)


@frozen(kw_only=True)
class CopyOptions:
    """:param seconds: how long the copy takes, in ``steps`` progress reports, each checking
        for cancellation.
    :param fail: raise at the last step (after writing some of the output)."""

    seconds: float = field(default=0.0, validator=in_range(0, 3600))
    steps: int = field(default=4, validator=in_range(1, 1000))
    fail: bool = False


class EchoCopy:
    def __init__(self, options: CopyOptions | None) -> None:
        self.options = options or CopyOptions()

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        steps = self.options.steps
        for path in artifact.path.iterdir():
            if path.is_file() and path.name != "manifest.json":
                shutil.copy2(path, context.output_dir / path.name)
        for step in range(steps):
            context.check_cancelled()
            context.progress(step / steps, f"step {step + 1}/{steps} loss {1 / (step + 1):.3f}")
            time.sleep(self.options.seconds / steps)
            if self.options.fail and step == steps - 1:
                raise RuntimeError(f"echo-copy was told to fail (writing {context.output_dir})")
        context.check_cancelled()
        context.progress(1.0, "done")
        options = {"seconds": self.options.seconds, "steps": steps, "fail": self.options.fail}
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="echo-copy",
            options=options,
            metrics_after={"copied_steps": float(steps)},
        )
        return Artifact(context.output_dir, manifest)


@hookimpl
def gptstore_optimization_strategies() -> Iterator[OptimizationStrategy]:
    yield OptimizationStrategy(
        name="echo-copy",
        factory=EchoCopy,
        options_type=CopyOptions,
        description="Copies an artifact in measured time (no model; for tests of jobs)",
    )
