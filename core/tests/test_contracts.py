"""The contract suites of gptstore.testing, run against the core's own plugins: the local source,
the three built-in policies, the echo backend and the hookspec example's strategy."""

from __future__ import annotations

import shutil
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.builtins.local import LocalOptions, LocalSource
from gptstore.builtins.scoring import Balanced, BestQuality, Smallest
from gptstore.testing.contracts import (
    BackendContract,
    OptimizerContract,
    ScorerContract,
    SourceContract,
)
from gptstore.testing.echo import EchoBackend, EchoOptions
from gptstore.types import Artifact, Manifest, Metric, ModelCard


class TestLocalSource(SourceContract):
    @pytest.fixture
    def source_name(self):
        return "local"

    @pytest.fixture
    def source(self, tmp_path, tiny_model):
        root = tmp_path / "models"
        for name in ("a", "b"):
            shutil.copytree(tiny_model, root / name)
        return LocalSource(LocalOptions(paths=(str(root),)))


def _cards():
    now = datetime.now(UTC)
    return [
        ModelCard(
            source="s",
            model_id=f"m{i}",
            parameters=10 ** (6 + i),
            popularity=10**i,
            updated_at=now - timedelta(days=100 * i),
            metrics=(Metric(name="mmlu", value=0.2 + 0.1 * i),),
        )
        for i in range(5)
    ]


@pytest.fixture
def cards():
    return _cards()


class TestBalanced(ScorerContract):
    @pytest.fixture
    def scorer(self):
        return Balanced(None)


class TestSmallest(ScorerContract):
    @pytest.fixture
    def scorer(self):
        return Smallest(None)


class TestBestQuality(ScorerContract):
    @pytest.fixture
    def scorer(self):
        return BestQuality(None)


class TestEchoBackend(BackendContract):
    @pytest.fixture
    def runner(self, tmp_path):
        runner = EchoBackend(EchoOptions()).load(Artifact(tmp_path, Manifest(id="echo")))
        yield runner
        runner.close()


class TestExampleStrategy(OptimizerContract):
    @pytest.fixture
    def optimizer(self):
        from gptstore import hookspecs

        namespace: dict = {}
        source = hookspecs.gptstore_optimization_strategies.__doc__.split("Example::")[1]
        exec(compile(textwrap.dedent(source), "example", "exec"), namespace)
        return namespace["MakeGreedy"](namespace["GreedyOptions"](max_new_tokens=4))

    @pytest.fixture
    def parent(self, tmp_path):
        store = ArtifactStore(tmp_path / "artifacts")
        staging = store.staging_dir()
        (staging / "config.json").write_text("{}")
        return store.commit(staging, Manifest(id="base", files=hash_files(staging)))
