"""Contract test suites: what the core relies on from a model source, a scoring policy, an
optimization strategy or a serving backend, as pytest classes any plugin runs against itself.

Subclass one in a test module of your plugin and provide its fixtures::

    from gptstore.testing.contracts import BackendContract


    class TestMyBackend(BackendContract):
        @pytest.fixture
        def runner(self, tiny_model):
            runner = MyBackend(MyOptions()).load(Artifact(tiny_model, Manifest(id="tiny")))
            yield runner
            runner.close()

Every test of the class then runs against your plugin. The suites check behaviour through the
documented protocols only (see docs/plugins/hooks.md), so a plugin that passes them works with
``gptstore sync``, ``select``, ``optimize`` and ``serve``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.catalog import Catalog
from gptstore.errors import Cancelled, GptstoreError
from gptstore.modelfiles import PICKLE_SUFFIXES
from gptstore.protocols import Optimizer, Refusal, Runner, Scorer, Source, SqlRankable
from gptstore.selection import select_models
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
)


class SourceContract:
    """A model source. Fixtures: ``source`` (built, its folders or server set up so that it
    lists at least one model) and ``source_name`` (its record's name)."""

    def test_status_says_whether_it_can_answer(self, source: Any) -> None:
        assert isinstance(source, Source)
        status = source.status()
        assert isinstance(status, SourceStatus)
        assert isinstance(status.message, str)
        assert status.message

    def test_search_yields_its_own_cards_or_refusals(self, source: Any, source_name: str) -> None:
        items = list(source.search(SearchQuery()))
        cards = [i for i in items if isinstance(i, ModelCard)]
        assert cards, "the source lists no model; set up its fixture with at least one"
        assert all(isinstance(i, ModelCard | Refusal) for i in items)
        assert {c.source for c in cards} == {source_name}
        assert len({c.uid for c in cards}) == len(cards), "model ids must be unique"

    def test_search_stops_at_its_limit(self, source: Any) -> None:
        cards = [i for i in source.search(SearchQuery(limit=1)) if isinstance(i, ModelCard)]
        assert len(cards) <= 1

    def test_fetch_puts_safetensors_in_a_new_folder_under_dest(
        self, source: Any, tmp_path: Path
    ) -> None:
        card = next(i for i in source.search(SearchQuery()) if isinstance(i, ModelCard))
        dest = tmp_path / "dest"
        dest.mkdir()
        folder = source.fetch(card.model_id, card.revision, dest)
        assert folder.is_dir()
        assert folder.resolve().is_relative_to(dest.resolve())
        assert folder.resolve() != dest
        assert list(folder.glob("*.safetensors")), "fetched models carry safetensors weights"
        assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]

    def test_fetching_an_unknown_model_is_a_clear_error(self, source: Any, tmp_path: Path) -> None:
        with pytest.raises(GptstoreError):
            source.fetch("no-such-model-anywhere", None, tmp_path)


class ScorerContract:
    """A scoring policy. Fixtures: ``scorer`` (built) and ``cards`` (a few cards, of one source,
    that differ in what the scorer weighs)."""

    requirement = Requirement()

    def test_scores_are_finite_and_explained(self, scorer: Any, cards: list[ModelCard]) -> None:
        assert isinstance(scorer, Scorer)
        for card in cards:
            score = scorer.score(card, self.requirement)
            assert isinstance(score, Score)
            assert math.isfinite(score.total)
            for criterion in score.breakdown:
                assert criterion.name
                assert isinstance(criterion.detail, str)

    def test_sql_ranking_agrees_with_python(
        self, scorer: Any, cards: list[ModelCard], tmp_path: Path
    ) -> None:
        if not isinstance(scorer, SqlRankable) or scorer.rank_sql(self.requirement) is None:
            pytest.skip("the scorer ranks in Python only")
        catalog = Catalog(tmp_path / "catalog.db")
        catalog.upsert(cards, cards[0].source)
        ranked = select_models(catalog, scorer, self.requirement, policy="x", limit=len(cards))
        assert ranked.ranked_in == "sql"
        in_sql = [c.card.uid for c in ranked.ranked]

        class PythonOnly:
            def score(self, card: ModelCard, requirement: Requirement) -> Score:
                return scorer.score(card, requirement)  # type: ignore[no-any-return]

        in_python = select_models(
            catalog, PythonOnly(), self.requirement, policy="x", limit=len(cards)
        )
        assert in_sql == [c.card.uid for c in in_python.ranked]


class OptimizerContract:
    """An optimization strategy. Fixtures: ``optimizer`` (built with its options) and ``parent``
    (an artifact it accepts, in an :class:`~gptstore.artifacts.ArtifactStore`)."""

    def _context(self, parent: Artifact, **kwargs: Any) -> OptimizationContext:
        output = ArtifactStore.of(parent).staging_dir()
        return OptimizationContext(output_dir=output, **kwargs)

    def test_apply_writes_the_output_folder_with_lineage(
        self, optimizer: Any, parent: Artifact
    ) -> None:
        assert isinstance(optimizer, Optimizer)
        progress: list[float] = []
        context = self._context(parent, progress=lambda f, _m: progress.append(f))
        try:
            result = optimizer.apply(parent, context)
            assert result.path.resolve() == context.output_dir.resolve()
            assert result.manifest.parent == parent.id
            assert result.manifest.step is not None
            assert result.manifest.files == hash_files(context.output_dir)
            assert all(0.0 <= f <= 1.0 for f in progress)
        finally:
            ArtifactStore.of(parent).discard(context.output_dir)

    def test_a_cancelled_run_stops(self, optimizer: Any, parent: Artifact) -> None:
        cancel = threading.Event()
        cancel.set()
        context = self._context(parent, cancel_event=cancel)
        try:
            with pytest.raises(Cancelled):
                optimizer.apply(parent, context)
        finally:
            ArtifactStore.of(parent).discard(context.output_dir)


class BackendContract:
    """A serving backend. Fixture: ``runner`` (loaded; closed by the fixture). ``prompt`` may
    be overridden with text the model tokenizes."""

    prompt = "Hello, my name is"

    def test_it_declares_what_it_can_do(self, runner: Any) -> None:
        assert isinstance(runner, Runner)
        info = runner.info()
        assert isinstance(info, RunnerInfo)
        assert info.context_length is None or info.context_length > 0
        assert runner.count_tokens(self.prompt) > 0
        assert isinstance(runner.health(), RunnerHealth)
        assert runner.health().ok

    def test_generate_answers_each_request_in_order(self, runner: Any) -> None:
        requests = [
            GenerationRequest(prompt=self.prompt, max_tokens=4),
            GenerationRequest(prompt=self.prompt + " and", max_tokens=2),
        ]
        answers = runner.generate(requests)
        assert len(answers) == 2
        assert all(isinstance(a, Generation) for a in answers)
        for request, answer in zip(requests, answers, strict=True):
            assert answer.finish_reason in ("stop", "length")
            assert 0 <= answer.completion_tokens <= request.max_tokens
            assert answer.prompt_tokens > 0

    def test_greedy_streams_give_the_generated_text(self, runner: Any) -> None:
        request = GenerationRequest(prompt=self.prompt, max_tokens=6)
        [whole] = runner.generate([request])
        chunks = list(runner.stream(request))
        assert chunks
        assert chunks[-1].finish_reason == whole.finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert "".join(c.text for c in chunks) == whole.text

    def test_logprobs_come_back_when_declared(self, runner: Any) -> None:
        if not runner.info().logprobs:
            pytest.skip("the runner declares no log-probabilities")
        request = GenerationRequest(prompt=self.prompt, max_tokens=3, logprobs=2)
        [answer] = runner.generate([request])
        assert answer.logprobs is not None
        assert len(answer.logprobs) >= answer.completion_tokens
        assert all(len(t.top) == 2 and t.logprob <= 0 for t in answer.logprobs)
        [scored] = runner.logprobs([self.prompt])
        assert scored.logprobs[0] is None
        assert len(scored.tokens) == len(scored.logprobs)

    def test_chat_prompts_are_text(self, runner: Any) -> None:
        try:
            prompt = runner.chat_prompt([ChatMessage("user", "Hi")])
        except GptstoreError:
            return  # a model without a chat template says so
        assert isinstance(prompt, str)
        assert "Hi" in prompt


def join_while_streaming(
    batcher: Any, first: GenerationRequest, later: Sequence[GenerationRequest]
) -> tuple[str, list[Generation]]:
    """Stream ``first`` through a continuous ``batcher``; once its first chunk is out, the
    ``later`` requests join the running batch. The first's streamed text and the others'
    answers; the batcher is closed."""
    import asyncio

    async def scenario() -> tuple[str, list[Generation]]:
        streamed, joined = [], None
        async for _index, chunk in batcher.stream([first]):
            streamed.append(chunk.text)
            if joined is None:  # the first row runs: the others join it
                joined = asyncio.ensure_future(
                    asyncio.gather(*(batcher.generate([r]) for r in later))
                )
        assert joined is not None
        return "".join(streamed), [g for [g] in await joined]

    try:
        return asyncio.run(scenario())
    finally:
        batcher.close()


class ContinuousBatchingContract:
    """A runner of the shared decode loop whose cache supports continuous batching (its
    ``_cache_select`` and ``_cache_join``): rows that join a running batch, leave it, or are
    bounded by ``max_batch`` or the KV budget decode what they decode alone. Fixture:
    ``runner`` (a :class:`~gptstore.serving.decoding.DecodingRunner`)."""

    prompts = ("Hello world", "The quick brown fox jumps over the", "a", "Once upon a time")

    @staticmethod
    def _alone(runner: Any, request: GenerationRequest) -> Generation:
        [answer] = runner.generate([request])
        return answer  # type: ignore[no-any-return]

    @staticmethod
    def _batcher(runner: Any, **options: Any) -> Any:
        from gptstore.serving.continuous import ContinuousBatcher

        settings = {"max_batch": 8, "max_queue": 64, **options}
        return ContinuousBatcher(runner, "contract", **settings)

    def _longest(self, runner: Any, max_tokens: int) -> GenerationRequest:
        requests = [GenerationRequest(prompt=p, max_tokens=max_tokens) for p in self.prompts]
        answers = runner.generate(requests)
        best = max(range(len(requests)), key=lambda i: answers[i].completion_tokens)
        if answers[best].completion_tokens < 6:
            pytest.skip("no prompt decodes 6 tokens before its end of sequence")
        return requests[best]

    def test_it_supports_continuous_batching(self, runner: Any) -> None:
        assert runner.continuous
        per_token = runner.kv_bytes_per_token()
        assert per_token is None or per_token > 0

    def test_rows_joining_a_running_batch_decode_as_alone(self, runner: Any) -> None:
        first = self._longest(runner, 24)
        later = [
            GenerationRequest(prompt=self.prompts[0], max_tokens=12),
            GenerationRequest(prompt=self.prompts[1], max_tokens=16, temperature=0.8, seed=7),
            GenerationRequest(prompt=self.prompts[2], max_tokens=8, logprobs=2),
            GenerationRequest(prompt=self.prompts[3], max_tokens=10, stop=("e",)),
        ]
        batcher = self._batcher(runner)
        text, answers = join_while_streaming(batcher, first, later)
        assert text == self._alone(runner, first).text
        for request, answer in zip(later, answers, strict=True):
            alone = self._alone(runner, request)
            assert (answer.text, answer.finish_reason) == (alone.text, alone.finish_reason)
            assert answer.completion_tokens == alone.completion_tokens
            if request.logprobs is not None:
                assert answer.logprobs is not None
                assert alone.logprobs is not None
                assert [t.token for t in answer.logprobs] == [t.token for t in alone.logprobs]
                for got, want in zip(answer.logprobs, alone.logprobs, strict=True):
                    assert math.isclose(got.logprob, want.logprob, abs_tol=1e-3)
        assert batcher.stats.largest >= 2  # they did run together

    def test_max_batch_bounds_the_running_rows(self, runner: Any) -> None:
        import asyncio

        requests = [
            GenerationRequest(prompt=p, max_tokens=n)
            for p, n in zip(self.prompts, (3, 9, 5, 7), strict=True)
        ]
        batcher = self._batcher(runner, max_batch=2)

        async def scenario() -> list[Generation]:
            answers = await asyncio.gather(*(batcher.generate([r]) for r in requests))
            return [g for [g] in answers]

        try:
            answers = asyncio.run(scenario())
        finally:
            batcher.close()
        assert [a.text for a in answers] == [self._alone(runner, r).text for r in requests]
        assert batcher.stats.largest == 2

    def test_a_stream_whose_client_left_leaves_the_batch(self, runner: Any) -> None:
        import asyncio

        batcher = self._batcher(runner)
        gone = self._longest(runner, 64)

        async def scenario() -> Generation:
            chunks = batcher.stream([gone])
            await chunks.__anext__()
            await chunks.aclose()  # the client disconnects after its first chunk
            [answer] = await batcher.generate([GenerationRequest(prompt="a", max_tokens=8)])
            return answer

        try:
            answer = asyncio.run(scenario())
        finally:
            batcher.close()
        assert answer.text == self._alone(runner, GenerationRequest(prompt="a", max_tokens=8)).text
        stats = batcher.stats
        # One row per step, but for at most a step or two while the disconnect was noticed.
        assert stats.rows - stats.batches <= 2

    def test_the_kv_budget_bounds_the_batch_and_refuses_what_never_fits(self, runner: Any) -> None:
        import asyncio

        per_token = runner.kv_bytes_per_token()
        if per_token is None:
            pytest.skip("the runner does not say how much cache a token takes")
        requests = [GenerationRequest(prompt=self.prompts[1], max_tokens=6) for _ in range(4)]
        reserved = runner.count_tokens(self.prompts[1]) + 6
        held = runner.kv_positions(reserved)  # what a row holds, allocated ahead or not
        assert held >= reserved
        batcher = self._batcher(runner, kv_budget=2 * held * per_token)

        async def scenario() -> list[Generation]:
            answers = await asyncio.gather(*(batcher.generate([r]) for r in requests))
            return [g for [g] in answers]

        async def too_large() -> None:
            await batcher.generate([GenerationRequest(prompt=self.prompts[1], max_tokens=3 * held)])

        try:
            answers = asyncio.run(scenario())
            with pytest.raises(GptstoreError, match="KV cache"):
                asyncio.run(too_large())
        finally:
            batcher.close()
        assert batcher.stats.largest == 2
        assert {a.text for a in answers} == {self._alone(runner, requests[0]).text}
