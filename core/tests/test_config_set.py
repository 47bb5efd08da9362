"""``gptstore config set`` checks the table it changes as the code that reads it will, and leaves
config.toml as it was when the value is wrong."""

from __future__ import annotations

import json
import tomllib

import pytest

from gptstore.testing import run_cli


@pytest.fixture
def home(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    home = tmp_path / "home"
    result = run_cli("--home", str(home), "init", "--local-path", str(models))
    assert result.returncode == 0, result.stderr
    return home


def config_set(home, key, value):
    return run_cli("--home", str(home), "config", "set", key, value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "sources.local.paths",
            "3",
            "config set sources.local.paths: invalid options of model source 'local': expected a "
            "list of strings, got int @ $.sources.local.paths; config.toml is unchanged",
        ),
        ("sources.local.max_depth", "deep", "expected int, got str @ $.sources.local.max_depth"),
        ("sources.local.enabled", "no", "expected bool, got str @ $.sources.local.enabled"),
        ("sources.local.speed", "1", "extra fields found (speed) @ $.sources.local"),
        (
            "policies.balanced.weights",
            "{ speed = 1 }",
            "unknown weight(s) speed; criteria are quality, size, popularity, recency "
            "@ $.policies.balanced",
        ),
        (
            "policies.smallest.weights",
            "{ size = 1 }",
            "options of scoring policy 'smallest': it takes no options, got weights @ "
            "$.policies.smallest",
        ),
        (
            "server.anonymous_inference",
            "yes",
            "expected bool, got str @ $.server.anonymous_inference",
        ),
        ("server.api_keys", '[{ key = "sk x" }]', "an API key must be non-empty printable ASCII"),
        (
            "deployments.smol.artifact",
            "smollm2-onnx",
            "required field missing @ $.deployments['smol'].backend; config.toml is unchanged; "
            "set the required keys together as one table, e.g. gptstore config set "
            "deployments.smol '{ KEY = VALUE, OTHER = VALUE }'",
        ),
        (
            "deployments.smol",
            '{ artifact = "smollm2-onnx", backend = "onnx", max_batch = "8" }',
            "expected int, got str @ $.deployments['smol'].max_batch",
        ),
        (
            "sourcez.local.paths",
            "[]",
            "config key 'sourcez.local.paths': unknown section 'sourcez'; config.toml has "
            "sources, policies, server, deployments",
        ),
    ],
)
def test_a_wrong_value_is_refused_and_config_toml_is_unchanged(home, key, value, message):
    before = (home / "config.toml").read_bytes()
    result = config_set(home, key, value)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: config ")
    assert message in line
    assert (home / "config.toml").read_bytes() == before


def test_right_values_are_saved_and_read(home):
    for key, value in [
        ("sources.local.max_depth", "2"),
        ("sources.local.enabled", "false"),
        ("policies.balanced.weights", "{ size = 1.0 }"),
        ("policies.balanced.weights.quality", "0.5"),
        ("server.anonymous_inference", "true"),
        ("deployments.smol", '{ artifact = "smollm2-onnx", backend = "onnx" }'),
        ("deployments.smol.max_batch", "4"),
    ]:
        result = config_set(home, key, value)
        assert result.returncode == 0, result.stderr
        assert not result.stderr
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["sources"]["local"]["max_depth"] == 2
    assert config["sources"]["local"]["enabled"] is False
    assert config["policies"]["balanced"] == {"weights": {"size": 1.0, "quality": 0.5}}
    assert config["server"] == {"anonymous_inference": True}
    assert config["deployments"]["smol"]["max_batch"] == 4
    # Every command still reads the config, [server] and [deployments] included.
    selected = run_cli("--home", str(home), "select", "--json")
    assert selected.returncode == 0, selected.stderr
    assert json.loads(selected.stdout)["policy"] == "balanced"


@pytest.mark.parametrize(
    ("key", "kind"),
    [("sources.nowhere.url", "model source"), ("policies.nowhere.weights", "scoring policy")],
)
def test_a_table_no_installed_plugin_owns_is_saved_with_a_warning(home, key, kind):
    result = config_set(home, key, "[1, 2]")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"warning: no installed plugin provides a {kind} named 'nowhere'"
    )
    section, name, option = key.split(".")
    assert tomllib.loads((home / "config.toml").read_text())[section][name] == {option: [1, 2]}
