"""The built-in ``store`` source: artifacts as cards, with lineage and measured figures."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import pytest

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.builtins.store import StoreSource
from gptstore.testing import add_artifact, run_cli
from gptstore.testing.contracts import SourceContract
from gptstore.types import Manifest, Measurement, RecipeStep


def _store(home, tiny_model):
    base = add_artifact(home / "artifacts", tiny_model, "tiny", origin="local:tiny@1")
    return ArtifactStore(home / "artifacts"), base


def test_artifacts_are_cards_with_lineage_and_measured_figures(tmp_path, tiny_model):
    home = tmp_path / "home"
    store, base = _store(home, tiny_model)
    staging = store.staging_dir()
    shutil.copy(base.path / "config.json", staging / "config.json")  # an export: no safetensors
    child = store.commit(
        staging,
        Manifest(
            id="tiny-onnx",
            kind="onnx",
            parent="tiny",
            step=RecipeStep("onnx-export", {}),
            files=hash_files(staging),
        ),
    )
    store.record(
        child,
        [
            Measurement(
                name="perplexity",
                value=12.5,
                backend="onnx",
                data="heldout.txt@abc",
                measured_at=datetime.now(UTC),
            ),
            Measurement(name="decode_tokens_per_s", value=80.0, backend="onnx", host="cpu"),
        ],
    )
    synced = run_cli("--home", str(home), "sync", "store")
    assert synced.returncode == 0, synced.stderr
    assert "store: 2 added" in synced.stdout
    shown = run_cli("--home", str(home), "show", "store:tiny-onnx", "--json")
    card = json.loads(shown.stdout)
    assert card["base_model"] == "tiny"
    assert (
        card["parameters"]
        == json.loads(run_cli("--home", str(home), "show", "store:tiny", "--json").stdout)[
            "parameters"
        ]
    )  # an export has its parent's parameters
    assert card["dtype"] is None  # but not its dtype
    assert card["license"] == "apache-2.0"  # from the parent's README
    metrics = {m["name"]: m for m in card["metrics"]}
    assert metrics["perplexity@onnx"]["origin"] == "measured"
    assert metrics["perplexity@onnx"]["dataset"] == "heldout.txt@abc"
    assert metrics["decode_tokens_per_s@onnx"]["value"] == 80.0
    selected = json.loads(
        run_cli(
            "--home", str(home), "select", "--source", "store", "--task", "text-generation",
            "--policy", "best-quality", "--json",
        ).stdout
    )  # fmt: skip
    ranked = {c["uid"]: c for c in selected["ranked"]}
    assert set(ranked) == {"store:tiny", "store:tiny-onnx"}
    # Measured speed is no accuracy: it does not count as quality.
    assert ranked["store:tiny-onnx"]["score"] == 0.0

    def select(*bounds: str) -> dict:
        shown = run_cli("--home", str(home), "select", "--source", "store", *bounds, "--json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)

    # A perplexity ceiling and a speed floor select on what was measured here.
    within = select("--max-measured", "perplexity@onnx=20", "--min-measured",
                    "decode_tokens_per_s@onnx=50")  # fmt: skip
    assert [c["uid"] for c in within["ranked"]] == ["store:tiny-onnx"]
    failures = {c["uid"]: c["failures"] for c in within["excluded"]}
    assert failures["store:tiny"] == [
        "perplexity@onnx not measured (gptstore eval ARTIFACT --backend BACKEND)",
        "decode_tokens_per_s@onnx not measured (gptstore eval ARTIFACT --backend BACKEND)",
    ]
    beyond = select("--min-measured", "decode_tokens_per_s@onnx=100")
    assert beyond["ranked"] == []
    assert {c["uid"]: c["failures"] for c in beyond["excluded"]}["store:tiny-onnx"] == [
        "decode_tokens_per_s@onnx 80 measured, not >= 100"
    ]
    unnamed = run_cli("--home", str(home), "select", "--max-measured", "perplexity=20")
    assert unnamed.returncode != 0
    assert "must be named FIGURE@BACKEND" in unnamed.stderr


class TestStoreSourceContract(SourceContract):
    @pytest.fixture
    def source_name(self):
        return "store"

    @pytest.fixture
    def source(self, store_home, tiny_model):
        _store(store_home.home, tiny_model)
        return StoreSource()


def test_lineage_shows_the_tree_with_steps_options_and_figures(tmp_path, tiny_model):
    home = tmp_path / "home"
    store, _base = _store(home, tiny_model)
    for name, parent, strategy in (
        ("tiny-a", "tiny", "onnx-export"),
        ("tiny-a-q", "tiny-a", "onnx-quantize"),
        ("tiny-b", "tiny", "make-greedy"),
    ):
        staging = store.staging_dir()
        (staging / "config.json").write_text("{}")
        store.commit(
            staging,
            Manifest(
                id=name,
                kind="onnx",
                parent=parent,
                step=RecipeStep(strategy, {"block_size": 32} if name == "tiny-a-q" else {}),
                metrics_after={"perplexity": 11.0} if name == "tiny-a-q" else {},
                files=hash_files(staging),
                created_at=datetime.now(UTC),
            ),
        )
    store.record(
        store.get("tiny-a-q"), [Measurement(name="decode_tokens_per_s", value=99.0, backend="onnx")]
    )
    shown = run_cli("--home", str(home), "lineage", "tiny-a-q")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if f"{n} " in line) for n in
             ("tiny ", "tiny-a ", "tiny-a-q ", "tiny-b ")]  # fmt: skip
    assert order == sorted(order)
    assert "imported from local:tiny@1" in shown.stdout
    assert "onnx-quantize (block_size=32)" in shown.stdout
    assert "perplexity 11; decode_tokens_per_s@onnx 99" in shown.stdout
    tree = json.loads(run_cli("--home", str(home), "lineage", "tiny-b", "--json").stdout)
    assert tree["id"] == "tiny"
    assert [d["id"] for d in tree["derived"]] == ["tiny-a", "tiny-b"]
    assert tree["derived"][0]["derived"][0]["measured"][0]["value"] == 99.0
