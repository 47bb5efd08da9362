"""The example recipes in docs/examples, run as written by ``gptstore optimize --recipe`` on a
tiny model with the plugins installed: a pruned, recovered, exported and quantized model whose
lineage shows every step and gate, served by ``gptstore serve`` to the openai client."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import openai
import pytest

from gptstore.testing import add_artifact, run_cli, serving_process

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
NEEDED = {
    "gptstore-prune": "gptstore_prune",
    "gptstore-lora": "gptstore_lora",
    "gptstore-onnx": "gptstore_onnx",
    "gptstore-torch": "gptstore_torch",
}


@pytest.fixture
def home(tmp_path, tiny_model):
    missing = [n for n, m in NEEDED.items() if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"plugins not installed: {', '.join(missing)}")
    home = tmp_path / "home"
    add_artifact(home / "artifacts", tiny_model, "tiny", origin="local:tiny@1")
    return home


def test_small_recipe_prunes_recovers_exports_quantizes_and_serves(home, tmp_path):
    env = {"GPTSTORE_HOME": str(home)}
    # As the README runs it, with the final artifact named for docs/examples/serve-small.toml.
    made = run_cli(
        "optimize", "--recipe", str(EXAMPLES / "small.toml"), "tiny", "--id", "smollm2-small",
        "--json", env=env, timeout=900,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    run = json.loads(made.stdout)
    assert run["passed"] is True
    assert run["final"] == "smollm2-small"
    assert [s["strategy"] for s in run["steps"]] == [
        "prune-mlp",
        "lora",
        "onnx-export",
        "onnx-quantize",
    ]
    assert [s["status"] for s in run["steps"]] == ["made"] * 4
    lora_gate = run["steps"][1]["gates"][0]
    assert lora_gate["metric"] == "perplexity@torch"
    assert lora_gate["baseline_of"] == "tiny"
    final_gates = {g["metric"]: g for g in run["steps"][3]["gates"]}
    assert final_gates["perplexity@onnx"]["baseline_of"] == "tiny on torch"
    assert final_gates["decode_tokens_per_s@onnx"]["value"] >= 10

    tree = json.loads(run_cli("lineage", run["final"], "--json", env=env).stdout)
    chain = []
    node = tree
    while node:
        chain.append((node["id"], node["step"]["strategy"] if node["step"] else None))
        node = node["derived"][0] if node["derived"] else None
    assert [s for _id, s in chain] == [None, "prune-mlp", "lora", "onnx-export", "onnx-quantize"]
    assert chain[-1][0] == run["final"]
    shown = run_cli("lineage", run["final"], env=env).stdout
    assert "gate passed: perplexity@onnx" in shown
    assert "gate passed: decode_tokens_per_s@onnx" in shown

    config = EXAMPLES / "serve-small.toml"
    with serving_process("--config", str(config), env=env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-demo", max_retries=0)
        answer = client.chat.completions.create(
            model="small",
            messages=[{"role": "user", "content": "hello there"}],
            max_tokens=8,
            temperature=0,
        )
        assert answer.usage.completion_tokens >= 1

    # Again: every step is reused and no figure is measured twice.
    again = run_cli(
        "optimize", "--recipe", str(EXAMPLES / "small.toml"), "tiny", "--id", "smollm2-small",
        "--json", env=env, timeout=900,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert [s["status"] for s in rerun["steps"]] == ["reused"] * 4
    assert rerun["final"] == run["final"]
    assert "measuring" not in again.stderr


def test_every_example_recipe_is_valid_with_the_plugins_installed(home):
    """Strategies, their options, gate backends and data files: what a run checks before its
    first step (running domain.toml too would repeat the LoRA, export and int8 steps above)."""
    from gptstore.manager import make_plugin_manager
    from gptstore.optimization.recipes import load_recipe

    manager = make_plugin_manager()
    recipes = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in recipes} >= {"small.toml", "domain.toml"}
    for path in recipes:
        if path.name.startswith("serve"):
            continue
        loaded = load_recipe(manager, path)
        assert loaded.recipe.description
        assert all(step.gates for step in loaded.recipe.steps if step.strategy == "lora")
