"""The ``gptstore`` command end to end, in subprocesses, over real model folders."""

from __future__ import annotations

import json
import shutil

import pytest

from gptstore.testing import run_cli
from gptstore.testing.models import readme_text

MODELS = {
    "alpha-chat": {
        "license": "apache-2.0",
        "language": ["en"],
        "tags": ["chat"],
        "pipeline_tag": "text-generation",
        "model-index": [
            {
                "name": "a",
                "results": [
                    {"dataset": {"name": "MMLU"}, "metrics": [{"type": "acc", "value": 0.4}]}
                ],
            }
        ],
    },
    "beta-coder": {
        "license": "mit",
        "language": ["en", "fr"],
        "tags": ["code"],
        "pipeline_tag": "text-generation",
    },
    "gamma-restricted": {"license": "llama3.2", "pipeline_tag": "text-generation"},
}


@pytest.fixture
def home(tmp_path, tiny_model):
    models = tmp_path / "models"
    for name, meta in MODELS.items():
        shutil.copytree(tiny_model, models / name)
        (models / name / "README.md").write_text(readme_text(meta, f"{name} model."))
    (models / "old-pickle").mkdir()
    (models / "old-pickle" / "config.json").write_text("{}")
    (models / "old-pickle" / "pytorch_model.bin").write_bytes(b"never read")
    home = tmp_path / "home"
    result = run_cli("--home", str(home), "init", "--local-path", str(models))
    assert result.returncode == 0, result.stderr
    return home, models


def cli(home, *args):
    return run_cli("--home", str(home), *args)


def test_sync_then_select_prints_a_ranked_explained_list(home):
    home, _models = home
    synced = cli(home, "sync")
    assert synced.returncode == 0, synced.stderr
    assert "local: 3 added, 0 updated, 0 unchanged, 0 delisted, 1 refused" in synced.stdout
    assert "refused old-pickle" in synced.stdout
    assert "only pickle weights" in synced.stdout

    result = cli(
        home,
        "select",
        "--task",
        "text-generation",
        "--max-params",
        "200M",
        "--license",
        "apache-2.0",
        "--license",
        "mit",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.index("local:alpha-chat") < out.index("local:beta-coder")
    assert "quality 0.40×0.4: mean of 1 metric(s): mmlu" in out
    assert "2 of 3 models meet the requirement" in out
    assert "local:gamma-restricted" in out
    assert "license llama3.2 not in apache-2.0, mit" in out

    data = json.loads(cli(home, "select", "--language", "fr", "--json").stdout)
    assert [r["uid"] for r in data["ranked"]] == ["local:beta-coder"]
    assert data["matched"] == 1
    assert data["total"] == 3


def test_resync_reports_unchanged_and_delisted(home):
    home, models = home
    cli(home, "sync")
    shutil.rmtree(models / "beta-coder")
    result = cli(home, "sync")
    assert "0 added, 0 updated, 2 unchanged, 1 delisted" in result.stdout
    shown = cli(home, "show", "local:beta-coder")
    assert "no (its source no longer lists it)" in shown.stdout
    ranked = json.loads(cli(home, "select", "--json").stdout)["ranked"]
    assert "local:beta-coder" not in [r["uid"] for r in ranked]
    ranked = json.loads(cli(home, "select", "--include-delisted", "--json").stdout)["ranked"]
    assert "local:beta-coder" in [r["uid"] for r in ranked]


def test_show_and_search(home):
    home, _models = home
    cli(home, "sync")
    shown = cli(home, "show", "alpha-chat")
    assert shown.returncode == 0
    for expected in (
        "LlamaForCausalLM",
        "apache-2.0",
        "context length",
        "2048",
        "mmlu: 0.4 (acc, reported)",
    ):
        assert expected in shown.stdout
    card = json.loads(cli(home, "show", "alpha-chat", "--json").stdout)
    assert card["parameters"] > 0
    assert card["dtype"] == "float32"
    found = json.loads(cli(home, "search", "code", "--json").stdout)
    assert [r["uid"] for r in found["results"]] == ["local:beta-coder"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("select", "--max-params", "lots"), "invalid --max-params: cannot read 'lots'"),
        (("select", "--min-metric", "mmlu"), "--min-metric 'mmlu': write NAME=VALUE"),
        (("select", "--min-metric", "mmlu=45"), "metric floor for mmlu must lie in 0..1"),
        (("select", "--policy", "fastest"), "unknown scoring policy 'fastest'; valid names:"),
        (
            ("select", "--policy", "smallest", "--weight", "quality=0.5"),
            "--weight: policy 'smallest' takes no weights",
        ),
        (("select", "--weight", "speed=1"), "unknown weight(s) speed; criteria are"),
        (("select", "--dtype", "float3"), "unknown dtype 'float3'"),
        (
            ("select", "--min-params", "2B", "--max-params", "1B"),
            "min_params 2.0B is above max_params",
        ),
        (("show", "nothing-like-this"), "no model 'nothing-like-this' in the catalog"),
        (("sync", "hub"), "unknown model source 'hub'; valid names:"),
        (("search", "?!"), "has no words to search for"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_1(home, args, message):
    home, _models = home
    result = cli(home, *args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    assert message in lines[0]


def test_bad_config_is_one_clear_line(home):
    home, _models = home
    (home / "config.toml").write_text("[sources.local]\npaths = 3\n")
    result = cli(home, "sync")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "$.sources.local.paths" in result.stderr
    (home / "config.toml").write_text("[sources.local\n")
    result = cli(home, "sources")
    assert result.returncode == 1
    assert "not valid TOML" in result.stderr


def test_fetch_makes_an_artifact_with_its_origin(home):
    home, _models = home
    cli(home, "sync")
    fetched = cli(home, "fetch", "alpha-chat")
    assert fetched.returncode == 0, fetched.stderr
    [artifact] = json.loads(cli(home, "artifacts", "--json").stdout)
    card = json.loads(cli(home, "show", "alpha-chat", "--json").stdout)
    assert artifact["origin"] == f"local:alpha-chat@{card['revision']}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(artifact["files"])
    assert artifact["id"] in fetched.stdout
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith(".staging")]
    missing = cli(home, "fetch", "old-pickle")
    assert missing.returncode == 1
    assert "no model 'old-pickle' in the catalog" in missing.stderr
