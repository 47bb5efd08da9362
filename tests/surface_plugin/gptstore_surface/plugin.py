"""The four extension points, importing nothing from gptstore but ``gptstore.plugin``:

- source ``shelf``: Hugging Face folders under a root, read with the core's card reader;
- policy ``newest``: the most recently updated first, in Python and in SQL;
- strategy ``stamp``: copies a model and writes generation defaults, behind a gate;
- backend ``reverse``: answers with the prompt's words in reverse order (no weights).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from attrs import field, frozen

from gptstore.plugin import (
    RANK_COLUMNS,
    Artifact,
    Criterion,
    Gate,
    Generation,
    GenerationRequest,
    ModelCard,
    ModelSource,
    NotFound,
    OptimizationContext,
    OptimizationStrategy,
    Refusal,
    RefusedModel,
    Requirement,
    RunnerHealth,
    RunnerInfo,
    Score,
    ScoringPolicy,
    SearchQuery,
    ServingBackend,
    SourceStatus,
    SqlRanking,
    StreamChunk,
    TextLogprobs,
    at_least,
    derive_manifest,
    hookimpl,
    matching,
    read_card,
    unstructure,
)

assert "updated_days" in RANK_COLUMNS  # the column this policy's SQL reads


@frozen
class ShelfOptions:
    root: str = "."


class Shelf:
    def __init__(self, options: ShelfOptions) -> None:
        self.root = Path(options.root)

    def search(self, query: SearchQuery):
        def scan():
            for folder in sorted(p for p in self.root.iterdir() if (p / "config.json").is_file()):
                try:
                    yield read_card(folder, folder.name, source="shelf")
                except RefusedModel as exc:
                    yield Refusal(folder.name, str(exc))

        return matching(scan(), query)

    def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
        folder = self.root / model_id
        if not (folder / "config.json").is_file() or "/" in model_id:
            raise NotFound(f"no model {model_id!r} on the shelf {self.root}")
        return Path(shutil.copytree(folder, dest / model_id))

    def status(self) -> SourceStatus:
        return SourceStatus(self.root.is_dir(), f"folders in {self.root}")


class Newest:
    def __init__(self, options: None) -> None:
        self.now = time.time() / 86400

    def score(self, card: ModelCard, requirement: Requirement) -> Score:
        moment = card.updated_at or card.created_at
        days = moment.timestamp() / 86400 if moment else None
        value = 0.0 if days is None else max(0.0, 1.0 - (self.now - days) / 3650)
        return Score(value, (Criterion("newness", value, 1.0, "ten-year scale"),))

    def rank_sql(self, requirement: Requirement) -> SqlRanking:
        return SqlRanking(
            "(CASE WHEN c.updated_days IS NULL THEN 0.0 "
            "ELSE max(0.0, 1.0 - (? - c.updated_days) / 3650) END)",
            (self.now,),
        )


@frozen
class StampOptions:
    max_new_tokens: int = field(default=32, validator=at_least(1))
    most_files: int = 100


class Stamp:
    def __init__(self, options: StampOptions) -> None:
        self.options = options

    def apply(self, artifact: Artifact, context: OptimizationContext) -> Artifact:
        files = [p for p in artifact.path.iterdir() if p.is_file() and p.name != "manifest.json"]
        Gate(metric="files", at_most=self.options.most_files).check(len(files))
        for index, path in enumerate(files):
            shutil.copy2(path, context.output_dir / path.name)
            context.progress(index / len(files), f"copied {path.name}")
            context.check_cancelled()
        defaults = {"do_sample": False, "max_new_tokens": self.options.max_new_tokens}
        (context.output_dir / "generation_config.json").write_text(json.dumps(defaults))
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="stamp",
            options=unstructure(self.options),
            metrics_after={"files": len(files)},
        )
        return Artifact(context.output_dir, manifest)


class ReverseRunner:
    def _words(self, request: GenerationRequest) -> list[str]:
        return request.prompt.split()[::-1][: request.max_tokens]

    def generate(self, requests):
        return [
            Generation(
                text=" ".join(self._words(r)),
                prompt_tokens=len(r.prompt.split()),
                completion_tokens=len(self._words(r)),
                finish_reason="length",
            )
            for r in requests
        ]

    def stream(self, request):
        for i, word in enumerate(self._words(request)):
            yield StreamChunk(word if i == 0 else f" {word}")
        yield StreamChunk("", finish_reason="length")

    def logprobs(self, texts):
        return [TextLogprobs(tuple(t.split()), (None,) * len(t.split())) for t in texts]

    def chat_prompt(self, messages):
        return " ".join(m.content for m in messages)

    def count_tokens(self, text):
        return len(text.split())

    def info(self):
        return RunnerInfo(context_length=64, logprobs=False)

    def health(self):
        return RunnerHealth(True, "reversing")

    def close(self):
        pass


class Reverse:
    def __init__(self, options: None) -> None:
        pass

    def load(self, artifact: Artifact) -> ReverseRunner:
        return ReverseRunner()


@hookimpl
def gptstore_model_sources():
    yield ModelSource(name="shelf", factory=Shelf, options_type=ShelfOptions)


@hookimpl
def gptstore_scoring_policies():
    yield ScoringPolicy(name="newest", factory=Newest, description="Most recently updated first")


@hookimpl
def gptstore_optimization_strategies():
    yield OptimizationStrategy(name="stamp", factory=Stamp, options_type=StampOptions)


@hookimpl
def gptstore_serving_backends():
    yield ServingBackend(name="reverse", factory=Reverse, description="Reversed prompt words")
