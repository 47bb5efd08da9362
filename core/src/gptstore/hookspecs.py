"""The four extension points of gptstore.

Every hook is a *registration* hook: it takes no arguments and returns (or yields) records from
:mod:`gptstore.records`. The core collects the records of every plugin, checks their names and
reports two records with the same name, naming both plugins.

Each docstring ends with a complete plugin module; copy it into a package that declares

.. code-block:: toml

    [project.entry-points.gptstore]
    myplugin = "myplugin.plugin"

and ``gptstore plugins`` lists it. docs/plugins/hooks.md documents the same hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gptstore.records import (
        ModelSource,
        OptimizationStrategy,
        ScoringPolicy,
        ServingBackend,
    )

hookspec = pluggy.HookspecMarker("gptstore")


# -------------------------------------------------------------------------------------------------
# model sources


@hookspec
def gptstore_model_sources() -> Iterable[ModelSource]:
    """Register places models come from.

    :returns: :class:`~gptstore.records.ModelSource` records. ``factory(options)`` returns a
        :class:`~gptstore.protocols.Source`; ``options`` is ``[sources.NAME]`` from config.toml
        structured into ``options_type``.

    Example::

        import shutil
        from pathlib import Path

        from attrs import frozen

        from gptstore.plugin import (
            ModelCard,
            ModelSource,
            Refusal,
            SearchQuery,
            SourceStatus,
            hookimpl,
        )


        @frozen
        class ShelfOptions:
            root: str = "/srv/models"


        class ShelfSource:
            def __init__(self, options: ShelfOptions) -> None:
                self.root = Path(options.root)

            def search(self, query: SearchQuery):
                for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                    if not list(folder.glob("*.safetensors")):
                        yield Refusal(folder.name, "no *.safetensors weights")
                    elif query.text is None or query.text.lower() in folder.name.lower():
                        yield ModelCard(source="shelf", model_id=folder.name,
                                        tasks=("text-generation",), location=str(folder))

            def fetch(self, model_id: str, revision: str | None, dest: Path) -> Path:
                return Path(shutil.copytree(self.root / model_id, dest / model_id))

            def status(self) -> SourceStatus:
                return SourceStatus(online=self.root.is_dir(), message=f"folders in {self.root}")


        @hookimpl
        def gptstore_model_sources():
            yield ModelSource(name="shelf", description="Models on the team's shared shelf",
                              factory=ShelfSource, options_type=ShelfOptions)
    """


# -------------------------------------------------------------------------------------------------
# scoring policies


@hookspec
def gptstore_scoring_policies() -> Iterable[ScoringPolicy]:
    """Register ways to rank the models that meet a requirement.

    :returns: :class:`~gptstore.records.ScoringPolicy` records. ``factory(options)`` returns a
        :class:`~gptstore.protocols.Scorer`; a new one is made for each selection. A scorer may
        also implement ``rank_sql`` (:class:`~gptstore.protocols.SqlRankable`) so that large
        catalogs are ranked inside SQLite.

    Example::

        from attrs import frozen

        from gptstore.plugin import Criterion, Score, ScoringPolicy, hookimpl

        PERMISSIVE = ("apache-2.0", "mit", "bsd-3-clause")


        @frozen
        class PermissiveOptions:
            licenses: tuple[str, ...] = PERMISSIVE


        class PreferPermissive:
            def __init__(self, options: PermissiveOptions) -> None:
                self.licenses = options.licenses

            def score(self, card, requirement):
                free = card.license in self.licenses
                quality = card.quality or 0.0
                return Score(
                    total=0.5 * free + 0.5 * quality,
                    breakdown=(
                        Criterion("license", float(free), 0.5, f"{card.license} is "
                                  + ("permissive" if free else "not on the permissive list")),
                        Criterion("quality", quality, 0.5, "mean of reported metrics"),
                    ),
                )


        @hookimpl
        def gptstore_scoring_policies():
            yield ScoringPolicy(name="prefer-permissive", factory=PreferPermissive,
                                options_type=PermissiveOptions,
                                description="Permissive licenses first, then quality")
    """


# -------------------------------------------------------------------------------------------------
# optimization strategies


@hookspec
def gptstore_optimization_strategies() -> Iterable[OptimizationStrategy]:
    """Register ways to derive a model from another (pruning, LoRA, ONNX export, quantization).

    :returns: :class:`~gptstore.records.OptimizationStrategy` records. ``factory(options)``
        returns an :class:`~gptstore.protocols.Optimizer`; its ``apply(artifact, context)``
        writes the new model into ``context.output_dir`` and returns it as an
        :class:`~gptstore.types.Artifact` whose manifest records the lineage.

    Example::

        import json
        import shutil

        from attrs import frozen

        from gptstore.plugin import Artifact, OptimizationStrategy, derive_manifest, hookimpl


        @frozen
        class GreedyOptions:
            max_new_tokens: int = 64


        class MakeGreedy:
            def __init__(self, options: GreedyOptions) -> None:
                self.options = options

            def apply(self, artifact, context):
                context.progress(0.0, "copying")
                for path in artifact.path.iterdir():
                    if path.is_file() and path.name != "manifest.json":
                        shutil.copy2(path, context.output_dir / path.name)
                    context.check_cancelled()
                config = {"do_sample": False, "max_new_tokens": self.options.max_new_tokens}
                (context.output_dir / "generation_config.json").write_text(json.dumps(config))
                context.progress(1.0, "done")
                manifest = derive_manifest(artifact, context.output_dir, strategy="make-greedy",
                                           options={"max_new_tokens": self.options.max_new_tokens})
                return Artifact(context.output_dir, manifest)


        @hookimpl
        def gptstore_optimization_strategies():
            yield OptimizationStrategy(name="make-greedy", factory=MakeGreedy,
                                       options_type=GreedyOptions,
                                       description="Set greedy decoding as the default")
    """


# -------------------------------------------------------------------------------------------------
# serving backends


@hookspec
def gptstore_serving_backends() -> Iterable[ServingBackend]:
    """Register ways to run a model (ONNX Runtime, PyTorch eager, a remote engine).

    :returns: :class:`~gptstore.records.ServingBackend` records. ``factory(options)`` returns a
        :class:`~gptstore.protocols.Backend`; its ``load(artifact)`` returns a
        :class:`~gptstore.protocols.Runner` with batched ``generate``, ``stream``, ``logprobs``,
        ``chat_prompt``, ``count_tokens``, ``info``, ``health`` and ``close``.

    Example::

        from attrs import frozen

        from gptstore.plugin import (
            Generation,
            RunnerHealth,
            RunnerInfo,
            ServingBackend,
            StreamChunk,
            TextLogprobs,
            hookimpl,
        )


        @frozen
        class EchoOptions:
            uppercase: bool = False


        class EchoRunner:
            # Answers with the prompt's words: a stand-in model for testing HTTP clients.
            def __init__(self, options: EchoOptions) -> None:
                self.options = options

            def _answer(self, request):
                words = request.prompt.split()[: request.max_tokens]
                text = " ".join(words)
                return text.upper() if self.options.uppercase else text

            def generate(self, requests):
                return [Generation(text=self._answer(r), prompt_tokens=len(r.prompt.split()),
                                   completion_tokens=len(self._answer(r).split()),
                                   finish_reason="length") for r in requests]

            def stream(self, request):
                words = self._answer(request).split()
                for i, word in enumerate(words):
                    yield StreamChunk(word if i == 0 else " " + word)
                yield StreamChunk("", finish_reason="length")

            def logprobs(self, texts):
                return [TextLogprobs(tuple(t.split()), (None,) + (0.0,) * (len(t.split()) - 1))
                        for t in texts]

            def chat_prompt(self, messages):
                return "\\n".join(f"{m.role}: {m.content}" for m in messages)

            def count_tokens(self, text):
                return len(text.split())

            def info(self):
                # No context limit; it returns no log-probabilities of generated tokens, so
                # the core refuses requests that ask for them.
                return RunnerInfo(context_length=None, logprobs=False)

            def health(self):
                return RunnerHealth(ok=True)

            def close(self):
                pass


        class EchoBackend:
            def __init__(self, options: EchoOptions) -> None:
                self.options = options

            def load(self, artifact):
                return EchoRunner(self.options)


        @hookimpl
        def gptstore_serving_backends():
            yield ServingBackend(name="echo", factory=EchoBackend, options_type=EchoOptions,
                                 description="Echoes prompts back (for testing clients)")
    """
