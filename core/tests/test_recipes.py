"""Recipes with quality gates (``gptstore optimize --recipe``), through the CLI in subprocesses
with a strategy installed as pip would install it: every step makes an artifact with lineage,
an identical step is reused, a failed gate keeps nothing past it, a bad recipe is refused before
any step runs, and a kill mid-step leaves no half artifact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gptstore.artifacts import ArtifactStore
from gptstore.optimization.gates import Gate, GateFailed
from gptstore.testing import add_artifact, run_cli

#: ``shrink`` copies its parent and scales a recorded figure, ``loss``, by ``factor``; with
#: ``pause`` it waits between files (a step long enough to be killed).
SHRINK = """
import shutil
import time

from attrs import field, frozen

from gptstore.plugin import (
    Artifact, OptimizationStrategy, derive_manifest, hookimpl, in_range, unstructure,
)


@frozen
class ShrinkOptions:
    factor: float = field(default=0.5, validator=in_range(0, 10))
    pause: float = 0.0


class Shrink:
    def __init__(self, options):
        self.options = options or ShrinkOptions()

    def apply(self, artifact, context):
        before = artifact.manifest.metrics_after.get("loss", 1.0)
        files = [p for p in artifact.path.iterdir() if p.is_file() and p.name != "manifest.json"]
        for index, path in enumerate(files):
            shutil.copy2(path, context.output_dir / path.name)
            context.progress((index + 1) / len(files), f"copied {index + 1} of {len(files)}")
            context.check_cancelled()
            time.sleep(self.options.pause)
        manifest = derive_manifest(
            artifact,
            context.output_dir,
            strategy="shrink",
            options=unstructure(self.options),
            data_digest=context.data.digest,
            metrics_before={"loss": before},
            metrics_after={"loss": before * self.options.factor},
        )
        return Artifact(context.output_dir, manifest)


@hookimpl
def gptstore_optimization_strategies():
    yield OptimizationStrategy(name="shrink", factory=Shrink, options_type=ShrinkOptions)
"""


@pytest.fixture
def shop(tmp_path, tiny_model, fake_dist):
    """(run, home, env): ``run(*args)`` runs gptstore on a store holding artifact ``base`` with the
    ``shrink`` strategy installed."""
    site = fake_dist("gptstore-shrink", {"shrink": "shrink_plugin"}, {"shrink_plugin": SHRINK})
    home = tmp_path / "home"
    add_artifact(home / "artifacts", tiny_model, "base", origin="local:tiny@1")
    path = os.pathsep.join(filter(None, (str(site), os.environ.get("PYTHONPATH"))))
    env = {"PYTHONPATH": path, "GPTSTORE_HOME": str(home)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=env)

    return run, home, env


def _recipe(tmp_path, text: str, name: str = "recipe.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


THREE_STEPS = """
name = "three"
description = "shrink, shrink, shrink"

[[steps]]
strategy = "shrink"
options = { factor = 0.5 }
gates = [{ metric = "loss", at_most = 0.6 }]

[[steps]]
strategy = "shrink"
options = { factor = %s }
data = "train.txt"
gates = [{ metric = "loss", relative = true, at_most = 0.0 }]

[[steps]]
strategy = "shrink"
options = { factor = 0.9 }
"""


def _ids(home) -> set[str]:
    return {a.id for a in ArtifactStore(home / "artifacts").list()}


def test_a_recipe_makes_each_step_with_lineage_and_gates_then_reuses_them(shop, tmp_path):
    run, home, _env = shop
    (tmp_path / "train.txt").write_text("one line\nanother line\n")
    recipe = _recipe(tmp_path, THREE_STEPS % "0.8")
    done = run("optimize", "base", "--recipe", str(recipe), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is True
    assert [s["status"] for s in report["steps"]] == ["made", "made", "made"]
    first, second, third = (s["artifact"] for s in report["steps"])
    assert report["final"] == third
    assert json.loads((home / "runs").joinpath(report["report"]).read_text()) == report
    store = ArtifactStore(home / "artifacts")
    assert [a.id for a in store.lineage(store.get(third))] == [third, second, first, "base"]
    made = store.get(second).manifest
    assert made.step.options == {"factor": 0.8, "pause": 0.0}
    assert made.step.data == made.data_digest is not None  # the data the recipe named
    [gate] = made.gates
    assert gate.metric == "loss"
    assert gate.passed
    assert gate.recipe == "three"
    assert gate.value == pytest.approx(0.4)
    assert gate.baseline == pytest.approx(0.5)
    # One stage line per message kind: not one per copied file.
    assert done.stderr.count("copied") == 3, done.stderr

    shown = run("lineage", third)
    assert shown.returncode == 0, shown.stderr
    assert "gate passed: loss 0.4 (-20.0% against 0.5), within at most +0%" in shown.stdout

    # The same recipe again: every step was made the same way from the same parent.
    again = run("optimize", "base", "--recipe", str(recipe), "--json")
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert [s["status"] for s in rerun["steps"]] == ["reused"] * 3
    assert [s["artifact"] for s in rerun["steps"]] == [first, second, third]
    assert _ids(home) == {"base", first, second, third}

    # Other options in step 3: steps 1 and 2 are reused, step 3 is made anew beside the old.
    changed = _recipe(tmp_path, (THREE_STEPS % "0.8").replace("0.9", "0.7"), "changed.toml")
    branch = json.loads(run("optimize", "base", "--recipe", str(changed), "--json").stdout)
    assert [s["status"] for s in branch["steps"]] == ["reused", "reused", "made"]
    assert branch["final"] not in {first, second, third}


def test_a_failed_gate_keeps_only_the_steps_that_passed(shop, tmp_path):
    run, home, _env = shop
    (tmp_path / "train.txt").write_text("one line\n")
    # Step 2 raises the loss by 50%: its gate allows no rise.
    recipe = _recipe(tmp_path, THREE_STEPS % "1.5")
    stopped = run("optimize", "base", "--recipe", str(recipe), "--json")
    assert stopped.returncode == 1
    assert "Traceback" not in stopped.stderr
    report = json.loads(stopped.stdout)
    assert report["passed"] is False
    assert [s["status"] for s in report["steps"]] == ["made", "gate failed"]
    first = report["steps"][0]["artifact"]
    assert report["steps"][1]["artifact"] is None
    [check] = report["steps"][1]["gates"]
    assert check["passed"] is False
    assert check["value"] == pytest.approx(0.75)
    assert "step 2 (shrink) failed its gate: loss 0.75 (+50.0% against 0.5), outside" in (
        stopped.stderr
    )
    assert f"Kept: {first}" in stopped.stderr
    assert _ids(home) == {"base", first}  # nothing past the gate, no staging folder left
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith(".")]
    saved = json.loads((home / "runs" / report["report"]).read_text())
    assert saved["steps"][1]["status"] == "gate failed"
    # The table a person reads says the same.
    table = run("optimize", "base", "--recipe", str(recipe))
    assert table.returncode == 1
    assert "gate failed" in table.stdout
    assert "reused" in table.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[steps]]\nstrategy = "nope"\n', "steps[1]: unknown optimization strategy 'nope'"),
        ('[[steps]]\nstrategy = "shrink"\noptions = { factor = 99 }\n', "factor must lie in"),
        (
            '[[steps]]\nstrategy = "shrink"\n[[steps]]\nstrategy = "shrink"\n'
            'options = { colour = "red" }\n',
            "colour",
        ),
        ('[[steps]]\nstrategy = "shrink"\ndata = "missing.txt"\n', "missing.txt': no such file"),
        (
            '[[steps]]\nstrategy = "shrink"\ngates = [{ metric = "loss" }]\n',
            "sets neither at_most nor at_least",
        ),
        (
            '[[steps]]\nstrategy = "shrink"\n'
            'gates = [{ metric = "accuracy", backend = "echo", at_least = 1 }]\n',
            "'accuracy' is not measured on a backend",
        ),
        (
            '[[steps]]\nstrategy = "shrink"\n'
            'gates = [{ metric = "perplexity", backend = "nope", at_most = 1 }]\n',
            "unknown serving backend 'nope'",
        ),
        ("!steps = []\n", "a recipe has 1 to 64 [[steps]]"),
        ('[[steps]]\nstrategy = "shrink"\nid = "../x"\n', "is not an artifact id"),
        ("[[steps]\n", "not valid TOML"),
    ],
)
def test_a_bad_recipe_is_refused_before_any_step_runs(shop, tmp_path, text, message):
    run, home, _env = shop
    # Step 1 is fine: the mistake is found before it runs. A "!" case is the whole file.
    whole = text[1:] if text.startswith("!") else '[[steps]]\nstrategy = "shrink"\n' + text
    recipe = _recipe(tmp_path, whole)
    refused = run("optimize", "base", "--recipe", str(recipe))
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert message in refused.stderr
    assert _ids(home) == {"base"}


def test_killed_mid_step_leaves_no_half_artifact(shop, tmp_path):
    run, home, env = shop
    slow = _recipe(
        tmp_path,
        '[[steps]]\nstrategy = "shrink"\n'
        '[[steps]]\nstrategy = "shrink"\noptions = { factor = 0.9, pause = 30 }\n',
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gptstore.cli", "optimize", "base", "--recipe", str(slow)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    artifacts = home / "artifacts"

    def staging() -> list[str]:
        return [p.name for p in artifacts.iterdir() if p.name.startswith(".")]

    deadline = time.monotonic() + 120
    while not (len(_ids(home)) == 2 and staging()):  # step 1 is in, step 2 is copying
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail("step 2 never started")
        time.sleep(0.05)
    # Another process's sweep leaves a folder its writer still holds.
    assert ArtifactStore(artifacts).sweep() == []
    assert staging()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    [first] = _ids(home) - {"base"}
    assert staging()  # what the killed step had written, outside the store's listing
    # The next run reuses step 1, sweeps the dead process's folder and makes step 2.
    quick = _recipe(
        tmp_path,
        '[[steps]]\nstrategy = "shrink"\n[[steps]]\nstrategy = "shrink"\n'
        "options = { factor = 0.9 }\n",
        "quick.toml",
    )
    again = run("optimize", "base", "--recipe", str(quick), "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert [s["status"] for s in report["steps"]] == ["reused", "made"]
    assert report["steps"][0]["artifact"] == first
    assert staging() == []


def test_a_gate_that_cannot_be_checked_removes_the_step_and_says_why(shop, tmp_path):
    run, home, _env = shop
    unrecorded = _recipe(
        tmp_path,
        '[[steps]]\nstrategy = "shrink"\n'
        '[[steps]]\nstrategy = "shrink"\noptions = { factor = 0.9 }\n'
        'gates = [{ metric = "accuracy", at_least = 0.5 }]\n',
    )
    stopped = run("optimize", "base", "--recipe", str(unrecorded), "--json")
    assert stopped.returncode == 1
    assert "Traceback" not in stopped.stderr
    assert "shrink recorded no figure 'accuracy' (it recorded: loss)" in stopped.stderr
    report = json.loads(stopped.stdout)
    assert [s["status"] for s in report["steps"]] == ["made", "failed"]
    assert _ids(home) == {"base", report["steps"][0]["artifact"]}  # step 2 is gone


@pytest.mark.parametrize("after", [math.nan, math.inf])
def test_a_diverged_figure_passes_no_gate(after):
    with pytest.raises(GateFailed, match="not a finite number"):
        Gate(metric="perplexity@torch", at_most=0.35, relative=True).check(after, 20.0)
    with pytest.raises(GateFailed, match="not a finite number"):
        Gate(metric="loss", at_most=10).check(after)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "Bad Name"], "is not an artifact id"),
        (["--id", "first"], "is also the id of another step"),
    ],
)
def test_a_bad_final_id_is_refused_before_any_step_runs(shop, tmp_path, args, message):
    run, home, _env = shop
    recipe = _recipe(
        tmp_path,
        '[[steps]]\nstrategy = "shrink"\nid = "first"\n[[steps]]\nstrategy = "shrink"\n',
    )
    refused = run("optimize", "base", "--recipe", str(recipe), *args)
    assert refused.returncode == 1
    assert message in refused.stderr
    assert _ids(home) == {"base"}
