"""Text gptstore did not write (model cards, folder names, plugin records, errors and messages) is
printed as written by every command: rich must not read ``[...]`` as markup or ``:x:`` as emoji.
Each hostile string is asserted verbatim in the output, in subprocesses over real model folders
and a plugin installed as pip would install it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from gptstore.testing import run_cli
from gptstore.testing.models import readme_text

#: A card description that made rich raise MarkupError (a closing tag with nothing open).
DESCRIPTION = "Use [/oops] with [bold]care[/bold] :fire:"
NAME = "M [beta]"
LICENSE = "[/oops]"
TAGS = ["[red]hot[/red]", ":fire:"]

HOSTILE = """
import shutil

from gptstore import hookimpl
from gptstore.artifacts import derive_manifest
from gptstore.errors import GptstoreError
from gptstore.records import ModelSource, OptimizationStrategy
from gptstore.types import Artifact, SourceStatus


class Source:
    def __init__(self, options):
        pass

    def status(self):
        return SourceStatus(False, "no network [/oops] [bold]at all[/bold]")

    def search(self, query):
        raise GptstoreError("cannot list [sources.hostile] :fire:")

    def fetch(self, model_id, revision, dest):
        raise GptstoreError("never asked")


class Copy:
    def __init__(self, options):
        pass

    def apply(self, artifact, context):
        context.progress(0.5, "copying [/oops]")
        for path in artifact.path.iterdir():
            if path.is_file() and path.name != "manifest.json":
                shutil.copy(path, context.output_dir / path.name)
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="copy",
            options={},
            metrics_after={"[/oops] agreement": 1.0},
        )
        return Artifact(context.output_dir, manifest)


@hookimpl
def gptstore_model_sources():
    yield ModelSource(name="hostile", factory=Source, description="([sources.x] path) :fire:")


@hookimpl
def gptstore_optimization_strategies():
    yield OptimizationStrategy(name="copy", factory=Copy, description="copies [/oops]")
"""

BROKEN = """
raise ImportError("needs the [extra] package [/oops] :fire:")
"""


@pytest.fixture
def hostile(tmp_path, tiny_model, fake_dist):
    """(run, models): ``run(*args)`` runs gptstore on a store over model folders with hostile
    cards, with the ``hostile`` and ``broken`` plugins installed."""
    site = fake_dist(
        "gptstore-hostile",
        {"hostile": "hostile_plugin", "broken": "broken_plugin"},
        {"hostile_plugin": HOSTILE, "broken_plugin": BROKEN},
    )
    models = tmp_path / "models [/oops]"
    shutil.copytree(tiny_model, models / "m[1]")
    (models / "m[1]" / "README.md").write_text(
        readme_text(
            {
                "model_name": NAME,
                "license": LICENSE,
                "tags": TAGS,
                "pipeline_tag": "text-generation",
            },
            DESCRIPTION,
        )
    )
    (models / "old[pickle]").mkdir()
    (models / "old[pickle]" / "config.json").write_text("{}")
    (models / "old[pickle]" / "pytorch_model.bin").write_bytes(b"never read")
    path = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    env = {"PYTHONPATH": path, "GPTSTORE_HOME": str(tmp_path / "home")}

    def run(*args):
        return run_cli(*args, env=env)

    initialized = run("init", "--local-path", str(models))
    assert initialized.returncode == 0, initialized.stderr
    synced = run("sync", "local")
    assert synced.returncode == 0, synced.stderr
    assert "refused old[pickle]: " in synced.stdout
    return run, models


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_card_text_is_printed_as_written(hostile):
    run, models = hostile
    found = ok(run("search"))
    for text in ("local:m[1]", LICENSE, DESCRIPTION):
        assert text in found
    shown = ok(run("show", "m[1]"))
    for text in ("local:m[1]", NAME, LICENSE, ", ".join(TAGS), DESCRIPTION, str(models)):
        assert text in shown
    ranked = ok(run("select", "--why", "local:m[1]"))
    assert "local:m[1]" in ranked.split("--why")[0]
    assert "local:m[1] meets the requirement" in ranked
    excluded = ok(run("select", "--license", "mit", "--why", "local:m[1]"))
    assert f"license {LICENSE} not in mit" in excluded
    assert f"local:m[1] is excluded: license {LICENSE} not in mit" in excluded
    assert str(models) in ok(run("config", "show"))


def test_plugin_text_is_printed_as_written(hostile):
    run, _models = hostile
    listed = run("plugins")
    assert "needs the [extra] package [/oops] :fire:" in ok(listed)
    assert "needs the [extra] package [/oops] :fire:" in listed.stderr  # the load warning
    sources = ok(run("sources"))
    assert "([sources.x] path) :fire:" in sources
    assert "no network [/oops] [bold]at all[/bold]" in sources
    synced = run("sync", "hostile")
    assert synced.returncode == 1
    assert "hostile: failed: cannot list [sources.hostile] :fire:" in synced.stderr


def test_artifact_lines_are_printed_as_written(hostile):
    run, _models = hostile
    fetched = ok(run("fetch", "m[1]", "--id", "m1"))
    assert "local:m[1] -> artifact m1" in fetched
    [artifact] = json.loads(ok(run("artifacts", "--json")))
    assert artifact["origin"] in ok(run("artifacts"))
    assert artifact["origin"].startswith("local:m[1]@")
    optimized = ok(run("optimize", "m1", "copy", "--id", "m1-copy"))
    assert "m1 -> m1-copy (hf)" in optimized
    assert "  [/oops] agreement: 1" in optimized
