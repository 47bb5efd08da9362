"""The OpenAPI schema is the truth: schemathesis generates requests from it (valid and invalid)
against a running server and checks every answer against it (status codes, bodies, headers,
content types, Allow on 405, 5xx). Bounded: a few dozen cases per operation, deterministic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

import gptstore.testing.echo
from gptstore.manager import make_plugin_manager
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.testing.echo import echo_artifact

CONFIG = Path(__file__).parent / "schemathesis.toml"
ADMIN = "sk-admin-openapi"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("openapi") / "home"
    echo_artifact(home / "artifacts")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                "deployments": {"echo": {"artifact": "echo", "backend": "echo"}},
            }
        )
    )
    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    with running_server(create_app(home, manager=manager)) as base:
        yield base


def test_the_schema_describes_bodies_streams_and_every_error(server):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{server}/schema/openapi.json") as answer:
        schema = json.load(answer)
    completions = schema["paths"]["/v1/completions"]["post"]
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "prompt"]
    assert body["properties"]["temperature"] == {"type": "number", "minimum": 0, "maximum": 2}
    assert set(completions["responses"]) == {
        "200", "400", "401", "404", "405", "413", "429", "500", "503"
    }  # fmt: skip
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    error = completions["responses"]["429"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}


def test_schemathesis_finds_no_violation(server, tmp_path):
    st = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [
            str(st),
            "--config-file",
            str(CONFIG),
            "run",
            f"{server}/schema/openapi.json",
            "--max-examples",
            "40",
            "--generation-deterministic",
            # Creating a deployment starts its replica processes (up to max_replicas).
            "--request-timeout",
            "60",
            "--header",
            f"Authorization: Bearer {ADMIN}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout or "No issues found" in run.stdout, run.stdout[-2000:]
