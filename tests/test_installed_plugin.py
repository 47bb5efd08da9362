"""A plugin installed by pip from its own package works with no change in core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gptstore.catalog import Catalog
from gptstore.testing import run_cli
from gptstore.types import Metric, ModelCard

REPO = Path(__file__).resolve().parents[1]


def test_policy_from_an_installed_package_is_selectable(tmp_path):
    """pip-installs plugins/_template for real (into a target folder) and selects with its
    policy through the CLI."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "plugins" / "_template"),
        ],
        check=True,
        capture_output=True,
    )
    assert (target / "gptstore_template" / "plugin.py").is_file()
    home = tmp_path / "home"
    catalog = Catalog(home / "catalog.db")
    catalog.upsert(
        [
            ModelCard(source="local", model_id="free", license="mit", parameters=10**6),
            ModelCard(
                source="local",
                model_id="restricted",
                license="llama3",
                parameters=10**6,
                metrics=(Metric(name="mmlu", value=0.9),),
            ),
        ],
        source="local",
    )
    catalog.close()
    env = {
        "PYTHONPATH": str(target),
        "GPTSTORE_HOME": str(home),
        "GPTSTORE_LOAD_PLUGINS": "template",
    }

    plugins = run_cli("plugins", env=env)
    assert plugins.returncode == 0, plugins.stderr
    assert "gptstore-template" in plugins.stdout
    assert "permissive-first" in plugins.stdout

    result = run_cli("select", "--policy", "permissive-first", "--json", env=env)
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)["ranked"]
    assert [r["uid"] for r in ranked] == ["local:free", "local:restricted"]
    assert ranked[0]["breakdown"][0]["detail"] == "mit is permissive"
