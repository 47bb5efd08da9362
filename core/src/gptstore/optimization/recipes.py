"""Recipes: ordered optimization steps, each with optional quality gates
(``gptstore optimize --recipe FILE.toml ARTIFACT``).

A recipe is a TOML file::

    name = "small"
    [[steps]]
    strategy = "prune-mlp"
    options = { fraction = 0.3 }
    [[steps]]
    strategy = "lora"
    options = { merge = true }
    gates = [{ metric = "perplexity", backend = "torch", relative = true, at_most = 0.35 }]

Every step makes an artifact with lineage, from the one before. A step made the same way as an
artifact the store holds (same parent, strategy, options and data) reuses it. A gate bounds a
figure of the step's result: one ``gptstore eval`` measures on a backend (``perplexity``,
``decode_tokens_per_s``, ...; relative gates compare with the recipe's input, or the step's
parent, measured the same way on the same data), or one the step recorded itself
(``heldout_perplexity``; relative gates compare with the step's own figure before). A failed
gate stops the recipe: the artifact that failed is removed (when this run made it) and the
artifacts before it, which passed, are kept. Every run writes a report of what each step did.
"""

from __future__ import annotations

import re
import threading
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from attrs import Factory, evolve, field, frozen

from gptstore.artifacts import ArtifactStore, check_artifact_id, write_json_atomic
from gptstore.converter import in_range, structure, unstructure
from gptstore.errors import GptstoreError, InvalidInput
from gptstore.manager import PluginManager, structure_options
from gptstore.optimization.data import default_heldout, load_dataset
from gptstore.optimization.evaluation import evaluate_artifact, host_description
from gptstore.optimization.gates import Gate, GateFailed
from gptstore.optimization.run import data_key, made_like, optimize
from gptstore.records import OptimizationStrategy, ServingBackend
from gptstore.types import Artifact, Dataset, GateCheck

#: Figures a gate can have ``gptstore eval`` measure (``backend`` set).
MEASURED_FIGURES = ("perplexity", "decode_tokens_per_s", "time_to_first_token_s", "resident_bytes")
#: The most steps a recipe may have.
MAX_STEPS = 64


@frozen(kw_only=True)
class RecipeGate:
    """A bound on one figure of a step's result.

    :param metric: with ``backend``, a figure ``gptstore eval`` measures there (see
        :data:`MEASURED_FIGURES`); without, a figure the step recorded (its ``metrics_after``).
    :param at_most: / :param at_least: the bounds (at least one). With ``relative``, they bound
        the change against a baseline (``after / before - 1``: 0.05 is +5%).
    :param baseline: what a relative gate compares with: the recipe's ``input`` or the step's
        ``parent``, measured the same way (on ``baseline_backend`` when the backend cannot load
        it, e.g. ``torch`` for the Hugging Face model an ONNX export came from). Without
        ``backend``, always the step's own figure before.
    :param options: options of the backend the figure is measured on.
    """

    metric: str
    backend: str | None = None
    at_most: float | None = field(default=None, validator=in_range(-1e300, 1e300))
    at_least: float | None = field(default=None, validator=in_range(-1e300, 1e300))
    relative: bool = False
    baseline: Literal["input", "parent"] = "input"
    baseline_backend: str | None = None
    options: dict[str, Any] = Factory(dict)

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.at_most is None and self.at_least is None:
            problems.append(f"the gate on {self.metric} sets neither at_most nor at_least")
        if self.backend is not None and self.metric not in MEASURED_FIGURES:
            problems.append(
                f"{self.metric!r} is not measured on a backend; use one of "
                f"{', '.join(MEASURED_FIGURES)}, or leave out backend to read a figure the "
                "step recorded"
            )
        if self.backend is None and (self.baseline_backend or self.options):
            problems.append(f"the gate on {self.metric} sets backend options but no backend")
        if self.backend is None and self.baseline != "input":
            problems.append(
                f"the gate on {self.metric} sets baseline but no backend: a recorded figure is "
                "compared with the step's own figure before"
            )
        if not self.relative and (self.baseline != "input" or self.baseline_backend):
            problems.append(f"the gate on {self.metric} sets a baseline but is not relative")
        if self.at_most is not None and self.at_least is not None and self.at_least > self.at_most:
            problems.append(
                f"the gate on {self.metric} can never pass: at_least {self.at_least:g} > "
                f"at_most {self.at_most:g}"
            )
        if problems:
            raise InvalidInput("gate", problems)

    @property
    def name(self) -> str:
        """The figure as the manifest names it (``perplexity@torch``)."""
        return f"{self.metric}@{self.backend}" if self.backend else self.metric

    def shown(self, value: float) -> str:
        """A bound as written: a signed percentage when relative (``+3.5%``)."""
        return f"{value * 100:+.4g}%" if self.relative else f"{value:.4g}"

    def bound(self, baseline_of: str | None) -> str:
        """The bound in words: ``at most +35% over smollm2``."""
        parts = [f"at most {self.shown(self.at_most)}"] if self.at_most is not None else []
        if self.at_least is not None:
            parts.append(f"at least {self.shown(self.at_least)}")
        against = f" against {baseline_of}" if self.relative and baseline_of else ""
        return " and ".join(parts) + against


@frozen(kw_only=True)
class RecipeStepSpec:
    """One step: a strategy with its options, its data (a path relative to the recipe file),
    the id its artifact gets (default: a fresh one) and its gates."""

    strategy: str
    options: dict[str, Any] = Factory(dict)
    data: str | None = None
    id: str | None = None
    gates: tuple[RecipeGate, ...] = ()


def _some_steps(_instance: Any, _attribute: Any, steps: tuple[RecipeStepSpec, ...]) -> None:
    if not 1 <= len(steps) <= MAX_STEPS:
        raise ValueError(f"a recipe has 1 to {MAX_STEPS} [[steps]], got {len(steps)}")


@frozen(kw_only=True)
class Recipe:
    """An ordered list of steps. ``eval_data``: held-out text measured gates compute
    perplexity on (default: the held-out tenth of the built-in corpus)."""

    name: str = ""
    description: str = ""
    eval_data: str | None = None
    steps: tuple[RecipeStepSpec, ...] = field(validator=_some_steps)


@frozen
class LoadedRecipe:
    """A recipe read and checked: strategies, options, backends and data files all exist."""

    recipe: Recipe
    path: Path
    data: tuple[Dataset | None, ...]
    eval_data: Dataset


def read_data(base: Path, value: str, where: str, *, confined: bool = False) -> Dataset:
    """The examples of a data file named in a recipe: relative to ``base`` (the recipe's
    folder); with ``confined`` (a recipe sent over HTTP), a plain relative path that stays in
    ``base``."""
    if confined:
        relative = Path(value)
        if relative.is_absolute() or ".." in relative.parts or not value.strip():
            raise InvalidInput(
                where,
                [f"{value!r}: name a file under $GPTSTORE_HOME/data (no absolute path, no '..')"],
            )
        path, missing = base / relative, f"{value!r}: no such file in $GPTSTORE_HOME/data"
    else:
        path = base / Path(value).expanduser()
        missing = f"{value!r}: no such file (relative to {base})"
    if not path.is_file():
        raise InvalidInput(where, [missing])
    data = load_dataset(path)
    if not data:
        raise InvalidInput(where, [f"{value!r} holds no examples"])
    return data


def load_recipe(manager: PluginManager, path: Path) -> LoadedRecipe:
    """Read ``path`` and check everything a run needs before any step starts: a typo in the
    last step's options is an error now, not after an hour of training."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(str(path), [f"cannot read it: {exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(str(path), [f"not valid TOML: {exc}"]) from None
    return check_recipe(manager, raw, what=str(path), path=path)


def check_recipe(
    manager: PluginManager,
    raw: Any,
    *,
    what: str,
    path: Path,
    data_root: Path | None = None,
) -> LoadedRecipe:
    """A recipe from its raw (TOML or JSON) form, checked as :func:`load_recipe` says.
    ``path``: where it came from (its stem names it, its folder holds its data files);
    ``data_root``: instead, the only folder its data files may be in (a recipe sent over HTTP
    names files under ``$GPTSTORE_HOME/data``)."""
    recipe = structure(raw, Recipe, what=what)
    if not recipe.name:
        recipe = evolve(recipe, name=path.stem)
    base, confined = (data_root, True) if data_root is not None else (path.parent, False)

    def data_of(value: str, where: str) -> Dataset:
        return read_data(base, value, where, confined=confined)

    datasets: list[Dataset | None] = []
    for index, step in enumerate(recipe.steps):
        where = f"{what}: steps[{index}]"
        try:
            record = manager.get(OptimizationStrategy, step.strategy)
            for gate in step.gates:
                if gate.backend is not None:
                    backend = manager.get(ServingBackend, gate.backend)
                    structure_options(backend, gate.options, where=f"{where}.gates.options")
                if gate.baseline_backend is not None:
                    manager.get(ServingBackend, gate.baseline_backend)
            if step.id is not None:
                check_artifact_id(step.id)
        except GptstoreError as exc:
            raise InvalidInput(where, [str(exc)]) from None
        structure_options(record, step.options, where=f"{where}.options")
        datasets.append(data_of(step.data, f"{where}.data") if step.data else None)
    ids = [step.id for step in recipe.steps if step.id]
    if len(set(ids)) < len(ids):
        raise InvalidInput(what, ["two steps name the same id; each step makes its own"])
    eval_data = (
        data_of(recipe.eval_data, f"{what}: eval_data") if recipe.eval_data else default_heldout()
    )
    return LoadedRecipe(recipe, path, tuple(datasets), eval_data)


@frozen(kw_only=True)
class StepOutcome:
    """What one step did: ``made`` or ``reused`` its artifact, or stopped the recipe
    (``gate failed``, ``failed``)."""

    index: int
    strategy: str
    status: Literal["made", "reused", "gate failed", "failed"]
    artifact: str | None = None
    gates: tuple[GateCheck, ...] = ()
    seconds: float = 0.0
    error: str | None = None


@frozen(kw_only=True)
class RecipeRun:
    """A recipe run: its steps' outcomes; ``final`` is the last artifact kept."""

    recipe: str
    input: str
    steps: tuple[StepOutcome, ...]
    final: str
    passed: bool
    started_at: datetime
    finished_at: datetime
    report: str | None = None


class RecipeStopped(GateFailed):
    """A recipe stopped at a failed gate or a failed step; ``run`` says what was kept."""

    def __init__(self, message: str, run: RecipeRun) -> None:
        super().__init__(message)
        self.run = run


def measured_value(
    manager: PluginManager,
    store: ArtifactStore,
    artifact: Artifact,
    figure: str,
    backend: str,
    options: dict[str, Any],
    data: Dataset,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[Artifact, float]:
    """``figure`` of ``artifact`` (as the store holds it now) on ``backend``: the one its
    manifest holds when it was measured with default options on the same data (perplexity) or
    on this host (speed, memory), else measured now with ``gptstore eval`` and recorded."""
    artifact = store.get(artifact.id)
    source = f"{data.origin}@{data.digest}"
    host = host_description()
    for m in artifact.manifest.measured if not options else ():
        same = m.data == source if figure == "perplexity" else m.host == host
        if m.name == figure and m.backend == backend and same:
            return artifact, m.value
    if progress is not None:
        progress(0.0, f"measuring {figure}@{backend} of {artifact.id}")
    result = evaluate_artifact(manager, store, artifact.id, backend, options, data)
    [value] = [m.value for m in result.measurements if m.name == figure]
    return result.artifact, value


class _Run:
    """One run of a loaded recipe over the store."""

    def __init__(
        self,
        manager: PluginManager,
        store: ArtifactStore,
        loaded: LoadedRecipe,
        input_artifact: Artifact,
        progress: Callable[[float, str], None],
    ) -> None:
        self.manager = manager
        self.store = store
        self.loaded = loaded
        self.input = input_artifact
        self.progress = progress

    def _measured(
        self, artifact: Artifact, gate: RecipeGate, backend: str, options: dict[str, Any]
    ) -> float:
        _artifact, value = measured_value(
            self.manager,
            self.store,
            artifact,
            gate.metric,
            backend,
            options,
            self.loaded.eval_data,
            self.progress,
        )
        return value

    def check(self, gate: RecipeGate, artifact: Artifact, parent: Artifact) -> GateCheck:
        """Measure or read the gate's figure and its baseline; the check, passed or not."""
        strategy = artifact.manifest.step.strategy if artifact.manifest.step else "the step"
        before: float | None = None
        baseline_of: str | None = None
        if gate.backend is None:
            after = artifact.manifest.metrics_after.get(gate.metric)
            if after is None:
                recorded = ", ".join(sorted(artifact.manifest.metrics_after)) or "none"
                raise InvalidInput(
                    f"gate on {gate.metric}",
                    [
                        f"{strategy} recorded no figure {gate.metric!r} (it recorded: "
                        f"{recorded}); set backend to measure one"
                    ],
                )
            if gate.relative:
                before = artifact.manifest.metrics_before.get(gate.metric)
                baseline_of = parent.id
                if before is None:
                    raise InvalidInput(
                        f"gate on {gate.metric}",
                        [
                            f"{strategy} recorded no {gate.metric!r} before the step to compare "
                            "with; make the gate absolute, or set backend to measure both"
                        ],
                    )
        else:
            after = self._measured(artifact, gate, gate.backend, gate.options)
            if gate.relative:
                base = self.input if gate.baseline == "input" else parent
                backend = gate.baseline_backend or gate.backend
                options = gate.options if backend == gate.backend else {}
                before = self._measured(base, gate, backend, options)
                baseline_of = f"{base.id} on {backend}" if backend != gate.backend else base.id
        if before == 0:
            raise InvalidInput(
                f"gate on {gate.name}", [f"the baseline of {baseline_of} is 0: no relative change"]
            )
        try:
            Gate(
                metric=gate.name,
                at_most=gate.at_most,
                at_least=gate.at_least,
                relative=gate.relative,
            ).check(after, before)
            passed = True
        except GateFailed:
            passed = False
        return GateCheck(
            metric=gate.name,
            value=after,
            bound=gate.bound(baseline_of),
            passed=passed,
            baseline=before,
            baseline_of=baseline_of,
            recipe=self.loaded.recipe.name,
        )


def describe_check(check: GateCheck) -> str:
    """``perplexity@torch 24.1 (+16.4% against 20.7), within at most +35% against smollm2``."""
    against = ""
    if check.baseline:
        against = f" ({check.value / check.baseline - 1:+.1%} against {check.baseline:.4g})"
    verdict = "within" if check.passed else "outside"
    return f"{check.metric} {check.value:.4g}{against}, {verdict} {check.bound}"


def report_name(recipe: str, started: datetime) -> str:
    """The file a run's report goes to: the start time and a slug of the recipe's name."""
    slug = re.sub(r"[^a-z0-9]+", "-", recipe.lower()).strip("-")[:80] or "recipe"
    return f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{slug}.json"


def _step_ids(loaded: LoadedRecipe, final_id: str | None) -> list[str | None]:
    """Each step's artifact id (``final_id`` names the last), checked before any step runs."""
    ids = [step.id for step in loaded.recipe.steps]
    if final_id is not None:
        ids[-1] = check_artifact_id(final_id)
    named = [i for i in ids if i]
    if len(set(named)) < len(named):
        raise InvalidInput("--id", [f"{final_id} is also the id of another step of the recipe"])
    return ids


def run_recipe(
    manager: PluginManager,
    store: ArtifactStore,
    loaded: LoadedRecipe,
    artifact_id: str,
    *,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    report_dir: Path | None = None,
    final_id: str | None = None,
) -> RecipeRun:
    """Run ``loaded`` from ``artifact_id``. Returns the run when every gate passed; raises
    :class:`RecipeStopped` (with the run) when a gate or a step failed. With ``report_dir``,
    the run's report is written there as JSON either way. ``final_id`` names the last step's
    artifact (over the recipe's own ``id``).

    A step's artifact is kept only once every gate passed: a failed gate, an error while
    measuring, or an interruption removes the artifact the step made (never one it reused)."""
    recipe = loaded.recipe
    say = progress or (lambda _fraction, _message: None)
    ids = _step_ids(loaded, final_id)
    started = datetime.now(UTC)
    run = _Run(manager, store, loaded, store.get(artifact_id), say)
    current = run.input
    outcomes: list[StepOutcome] = []
    stop: str | None = None
    count = len(recipe.steps)
    try:
        for index, (step, data) in enumerate(zip(recipe.steps, loaded.data, strict=True)):
            clock = time.perf_counter()
            label = f"step {index + 1}/{count} {step.strategy}"

            def step_progress(fraction: float, message: str, label: str = label) -> None:
                say(fraction, f"{label}: {message}")

            run.progress = step_progress
            record = manager.get(OptimizationStrategy, step.strategy)
            structured = structure_options(record, step.options, where="options")
            plain = unstructure(structured) if structured else {}
            existing = (
                store.find(ids[index])  # type: ignore[arg-type]
                if ids[index]
                else made_like(store, current.id, record.name, plain, data_key(data))
            )
            made: Artifact | None = None
            checks: list[GateCheck] = []
            try:
                artifact = optimize(
                    manager,
                    store,
                    current.id,
                    step.strategy,
                    step.options,
                    data=data,
                    progress=step_progress,
                    cancel=cancel,
                    new_id=existing.id if existing is not None else ids[index],
                )
                made = None if existing is not None else artifact
                for gate in step.gates:
                    checks.append(run.check(gate, store.get(artifact.id), current))
            except BaseException as exc:
                if made is not None:
                    store.remove(made)  # half-checked: nothing of this step stays
                if not isinstance(exc, GptstoreError):
                    raise
                stop = f"step {index + 1} ({step.strategy}) failed: {exc}"
                outcomes.append(
                    StepOutcome(
                        index=index,
                        strategy=step.strategy,
                        status="gate failed" if isinstance(exc, GateFailed) else "failed",
                        gates=tuple(checks),
                        seconds=time.perf_counter() - clock,
                        error=str(exc),
                    )
                )
                break
            artifact = store.get(artifact.id)  # measurements may have been recorded
            failed = [c for c in checks if not c.passed]
            if failed:
                if made is not None:
                    store.remove(artifact)
                stop = f"step {index + 1} ({step.strategy}) failed its gate: " + "; ".join(
                    describe_check(c) for c in failed
                )
                if made is None:
                    stop += f" ({artifact.id} existed before this run and is kept)"
            elif checks:
                artifact = store.record(artifact, gates=checks)
            outcomes.append(
                StepOutcome(
                    index=index,
                    strategy=step.strategy,
                    status="gate failed" if failed else ("made" if made else "reused"),
                    artifact=None if failed and made else artifact.id,
                    gates=tuple(checks),
                    seconds=time.perf_counter() - clock,
                )
            )
            if failed:
                break
            current = artifact
    finally:
        result = RecipeRun(
            recipe=recipe.name,
            input=run.input.id,
            steps=tuple(outcomes),
            final=current.id,
            passed=stop is None and len(outcomes) == count,
            started_at=started,
            finished_at=datetime.now(UTC),
        )
        if report_dir is not None:
            path = report_dir / report_name(recipe.name, started)
            try:
                report_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, unstructure(evolve(result, report=str(path))))
                result = evolve(result, report=str(path))
            except OSError as exc:  # the run's outcome matters more than its report
                say(1.0, f"could not write the report {path}: {exc}")
    if stop is not None:
        kept = [o.artifact for o in outcomes if o.artifact and o.status != "gate failed"]
        raise RecipeStopped(
            f"recipe {recipe.name} stopped: {stop}. Kept: {', '.join(kept) or 'nothing'}"
            + (f". Report: {result.report}" if result.report else ""),
            result,
        )
    return result
