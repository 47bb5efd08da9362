"""A plugin written against the documented import surface alone (``tests/surface_plugin``),
installed as pip would (a distribution with a ``gptstore`` entry point), used through the
command line and the HTTP API like any plugin."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import openai
import pytest
import tomli_w

from gptstore.testing import run_cli, serving_process

PACKAGE = Path(__file__).parent / "surface_plugin"


def test_the_plugin_imports_nothing_but_the_surface():
    imported = set()
    for path in (PACKAGE / "gptstore_surface").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    assert {m for m in imported if m.split(".")[0] == "gptstore"} == {"gptstore.plugin"}


def _installed(tmp_path: Path) -> dict[str, str]:
    """A site folder holding the plugin's distribution, on PYTHONPATH for subprocesses."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE / "gptstore_surface", site / "gptstore_surface")
    info = site / "gptstore_surface-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gptstore-surface\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gptstore]\nsurface = gptstore_surface.plugin\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "GPTSTORE_STRICT_PLUGINS": "1"}


def test_every_extension_point_works_through_the_cli_and_http(tmp_path, tiny_model):
    env = _installed(tmp_path)
    shelf = tmp_path / "shelf"
    shutil.copytree(tiny_model, shelf / "tiny")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "sources": {"shelf": {"root": str(shelf)}, "local": {"enabled": False}},
            }
        )
    )

    def cli(*args: str) -> str:
        result = run_cli("--home", str(home), *args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    plugins = json.loads(cli("plugins", "--json"))
    [surface] = [p for p in plugins if p["name"] == "surface"]
    assert surface["status"] == "loaded"
    assert len(surface["hooks"]) == 4

    assert "shelf: 1 added" in cli("sync")
    selection = json.loads(cli("select", "--policy", "newest", "--json"))
    assert [c["uid"] for c in selection["ranked"]] == ["shelf:tiny"]
    assert selection["ranked_in"] == "sql"

    cli("fetch", "shelf:tiny", "--id", "tiny")
    cli("optimize", "tiny", "stamp", "--option", "max_new_tokens=5", "--id", "tiny-stamped")
    artifacts = {a["id"]: a for a in json.loads(cli("artifacts", "--json"))}
    assert artifacts["tiny-stamped"]["parent"] == "tiny"
    assert artifacts["tiny-stamped"]["step"]["options"] == {"max_new_tokens": 5, "most_files": 100}
    refused = run_cli(
        "--home", str(home), "optimize", "tiny", "stamp", "--option", "most_files=1", env=env
    )
    assert refused.returncode == 1
    assert "outside its gate (at most 1); the result is discarded" in refused.stderr

    serve = tmp_path / "serve.toml"
    serve.write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": "sk-surface"}]},
                "deployments": {"rev": {"artifact": "tiny-stamped", "backend": "reverse"}},
            }
        )
    )
    with serving_process("--config", str(serve), env={**env, "GPTSTORE_HOME": str(home)}) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-surface", max_retries=0)
        answer = client.completions.create(model="rev", prompt="one two three", max_tokens=2)
        assert answer.choices[0].text == "three two"
        chunks = client.chat.completions.create(
            model="rev",
            messages=[{"role": "user", "content": "a b c"}],
            max_tokens=3,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "c b a"
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="rev", prompt="x " * 60, max_tokens=10)
        assert refused.value.code == "context_length_exceeded"
