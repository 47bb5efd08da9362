"""One selection, two ways in: ``gptstore select`` and ``POST /store/select`` read config.toml's
``[policies.NAME]`` alike and rank alike, over a real store served by uvicorn."""

from __future__ import annotations

import json
import shutil
import tomllib
import urllib.error
import urllib.request

import pytest
import tomli_w

from gptstore.server import create_app
from gptstore.testing import run_cli, running_server
from gptstore.testing.models import build_causal_lm, readme_text

KEY = "sk-select-test"
#: Size alone decides: the smaller model must rank first although the other reports quality.
SIZE_ONLY = {"size": 1.0, "quality": 0.0, "popularity": 0.0, "recency": 0.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    """(home, base URL): two models, a larger one with a reported mmlu of 0.9 and a smaller one
    with none, synced; config.toml weighs size only; the app serves no deployments."""
    root = tmp_path_factory.mktemp("select-http")
    models = root / "models"
    shutil.copytree(tiny_model, models / "larger-good")
    index = [
        {
            "name": "larger-good",
            "results": [{"dataset": {"name": "MMLU"}, "metrics": [{"type": "acc", "value": 0.9}]}],
        }
    ]
    (models / "larger-good" / "README.md").write_text(
        readme_text({"pipeline_tag": "text-generation", "model-index": index}, "Larger.")
    )
    build_causal_lm(
        models / "smaller-plain", hidden_size=64, readme={"pipeline_tag": "text-generation"}
    )
    home = root / "home"
    for args in (("init", "--local-path", str(models)), ("sync",)):
        result = run_cli("--home", str(home), *args)
        assert result.returncode == 0, result.stderr
    config = tomllib.loads((home / "config.toml").read_text())
    config["policies"] = {"balanced": {"weights": SIZE_ONLY}}
    config["server"] = {"api_keys": [{"key": KEY, "role": "user"}]}
    (home / "config.toml").write_text(tomli_w.dumps(config))
    with running_server(create_app(home)) as base:
        yield home, base


def post_select(base, body):
    request = urllib.request.Request(
        f"{base}/store/select",
        method="POST",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def cli_select(home, *args):
    result = run_cli("--home", str(home), "select", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ranking(selection):
    return [
        (r["uid"], round(r["score"], 9), [(c["name"], c["weight"]) for c in r["breakdown"]])
        for r in selection["ranked"]
    ]


def test_config_weights_rank_alike_through_the_cli_and_http(store):
    home, base = store
    status, answer = post_select(base, {})
    assert status == 200, answer
    assert ranking(answer) == ranking(cli_select(home))
    assert [r["uid"] for r in answer["ranked"]] == ["local:smaller-plain", "local:larger-good"]


def test_request_options_go_over_config_like_the_weight_flag(store):
    home, base = store
    status, answer = post_select(base, {"options": {"weights": {"quality": 1.0}}})
    assert status == 200, answer
    assert ranking(answer) == ranking(cli_select(home, "--weight", "quality=1"))
    # quality 1 over config's size 1 (not over the default weights): the larger model now wins
    [first, _second] = answer["ranked"]
    assert first["uid"] == "local:larger-good"
    assert {c["name"]: c["weight"] for c in first["breakdown"]} == {**SIZE_ONLY, "quality": 1.0}


def test_a_bad_request_option_is_named_at_its_place(store):
    _home, base = store
    status, answer = post_select(base, {"options": {"weights": {"speed": 1.0}}})
    assert status == 400
    assert answer["error"]["message"].endswith(
        "unknown weight(s) speed; criteria are quality, size, popularity, recency @ $.options"
    )
