"""Optimization jobs: one step, or a recipe, run in a process of its own, with progress, events,
cancellation and a record that outlives the server.

:class:`Jobs` (the server's side) checks a :class:`JobRequest` at once (a typo is a 400 now,
not a failure an hour later), writes the job's record under ``$GPTSTORE_HOME/jobs/<id>/`` and
starts ``python -m gptstore.optimization.jobs FOLDER`` for it: the server's event loop and its
deployments never share a process with a training run. At most ``max_running`` jobs run at a
time; the others wait, in the order they came.

The job's process (:func:`main`) appends every progress report to ``events.jsonl`` (one JSON
object a line: the record :meth:`Jobs.events` reads and ``GET /store/jobs/{id}/events`` streams)
and keeps ``job.json`` up to date (written to a temporary file and renamed). Cancelling sends it
SIGTERM: the step sees :meth:`~gptstore.types.OptimizationContext.check_cancelled` raise, its
staging folder is removed, and a recipe removes what the interrupted step made. A step that does
not stop within :data:`GRACE` seconds is killed, and the store's staging sweep removes its
folder. Either way no half artifact is left. The process watches its standard input too: if the
server dies, the job cancels itself. A server that starts again marks any job its predecessor
left running as failed.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from attrs import Factory, define, field, frozen

from gptstore.artifacts import (
    ARTIFACT_ID_PATTERN,
    ArtifactStore,
    check_artifact_id,
    write_json_atomic,
)
from gptstore.converter import structure, unstructure
from gptstore.errors import (
    Cancelled,
    Conflict,
    GptstoreError,
    InvalidInput,
    NotFound,
    Unavailable,
    UnknownName,
)
from gptstore.manager import (
    PluginManager,
    importable_plugins,
    plugins_of,
    structure_options,
)
from gptstore.optimization.recipes import (
    LoadedRecipe,
    RecipeStopped,
    check_recipe,
    load_recipe,
    read_data,
    run_recipe,
)
from gptstore.optimization.run import optimize
from gptstore.records import OptimizationStrategy
from gptstore.types import Dataset

log = logging.getLogger("gptstore.jobs")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ENDED = frozenset({"succeeded", "failed", "cancelled"})


def scrub(text: str, home: Path) -> str:
    """``text`` with the store's folder written as ``$GPTSTORE_HOME``."""
    return text.replace(str(home.resolve()), "$GPTSTORE_HOME").replace(str(home), "$GPTSTORE_HOME")


@define
class EventCursor:
    """Where a reader of a job's reports stopped: the bytes read, and the reports in them."""

    offset: int = 0
    count: int = 0


JOB_FILE, EVENTS_FILE, LAUNCH_FILE, LOG_FILE = "job.json", "events.jsonl", "launch.json", "log.txt"
#: Seconds a cancelled job has to stop before its process is killed.
GRACE = 15.0
#: Seconds between two writes of a running job's record (its events are all written).
RECORD_EVERY = 0.5
_JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
JOB_ID_PATTERN = _JOB_ID.pattern


@frozen(kw_only=True)
class JobRequest:
    """What a job does: one optimization ``strategy`` (with ``options`` and ``data``), or a
    ``recipe`` (the recipe itself, as its TOML would be) or ``recipe_file`` (the name of
    ``$GPTSTORE_HOME/recipes/NAME.toml``), applied to ``artifact``. ``id``: the id of the
    artifact it makes (the recipe's last); an artifact of that id made the same way is reused.
    ``data`` and a sent recipe's data files name files under ``$GPTSTORE_HOME/data``."""

    artifact: str = field(metadata={"json_schema": {"pattern": ARTIFACT_ID_PATTERN}})
    strategy: str | None = None
    options: dict[str, Any] = Factory(dict)
    data: str | None = None
    recipe: dict[str, Any] | None = None
    recipe_file: str | None = None
    id: str | None = None

    def __attrs_post_init__(self) -> None:
        given = [k for k in ("strategy", "recipe", "recipe_file") if getattr(self, k) is not None]
        problems = []
        if len(given) != 1:
            problems.append(
                "give exactly one of strategy, recipe and recipe_file"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.strategy is None and (self.options or self.data):
            problems.append("options and data go with strategy; a recipe's steps carry their own")
        if problems:
            raise InvalidInput("job", problems)


@define(kw_only=True)
class Job:
    """A job as its record keeps it. ``result``: the artifact it made (a recipe's last);
    ``report``: a recipe's run, step by step; ``error``: why it failed or was cancelled."""

    id: str
    request: JobRequest
    state: JobState = "queued"
    progress: float = 0.0
    message: str = ""
    created_at: datetime = Factory(lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    by: str = "config"
    result: str | None = None
    error: str | None = None
    report: dict[str, Any] | None = None
    pid: int | None = None
    #: Progress reports written so far (the events stream's length).
    events: int = 0

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def _now() -> datetime:
    return datetime.now(UTC)


def _read_job(folder: Path) -> Job:
    data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    return structure(data, Job, what=f"job record {folder.name}", path="$")


def _write_job(folder: Path, job: Job) -> None:
    write_json_atomic(folder / JOB_FILE, unstructure(job))


# -- the server's side --------------------------------------------------------------------------


class Jobs:
    """The jobs of one store, run by one server process (thread-safe). ``home``: the store's
    folders (a :class:`gptstore.config.Store`)."""

    def __init__(
        self,
        manager: PluginManager,
        artifacts: ArtifactStore,
        *,
        jobs_dir: Path,
        data_dir: Path,
        recipes_dir: Path,
        max_running: int = 1,
    ) -> None:
        self.manager = manager
        self.artifacts = artifacts
        self.root = jobs_dir
        self.data_dir = data_dir
        self.recipes_dir = recipes_dir
        self.max_running = max_running
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        #: Jobs being cancelled, and why.
        self._cancelling: dict[str, str] = {}
        self._closed = False
        self._lock = threading.RLock()
        #: Only one server runs a store's jobs: the one holding this lock (another server on
        #: the same store, even one that is only starting, must not take its jobs for dead).
        self._owner = _lock_jobs(jobs_dir)
        if self._owner is not None:
            self._recover()
        else:
            log.warning("another gptstore serve runs the jobs of %s; this one runs none", jobs_dir)

    def _check_owner(self) -> None:
        if self._owner is None:
            raise Unavailable(
                "another gptstore serve process runs this store's optimization jobs; start and "
                "cancel jobs there"
            )

    # -- records ---------------------------------------------------------------------------

    def _folder(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise NotFound(f"no job {job_id!r} (a job id looks like 20261204-142501-a1b2c3)")
        folder = self.root / job_id
        if not (folder / JOB_FILE).is_file():
            raise NotFound(f"no job {job_id!r}")
        return folder

    def get(self, job_id: str) -> Job:
        return _read_job(self._folder(job_id))

    def list(self) -> list[Job]:
        """Every job, the newest first."""
        if not self.root.is_dir():
            return []
        jobs = []
        for folder in self.root.iterdir():
            if _JOB_ID.match(folder.name) and (folder / JOB_FILE).is_file():
                try:
                    jobs.append(_read_job(folder))
                except (OSError, ValueError, GptstoreError) as exc:
                    log.warning("job record %s unreadable: %s", folder, exc)
        return sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)

    def events(
        self, job_id: str, after: int = 0, cursor: EventCursor | None = None
    ) -> builtins.list[dict[str, Any]]:
        """The job's progress reports from the ``after``-th on (each with its number, ``n``,
        counted from 1). With a ``cursor``, reading starts where the last read with it ended
        (a stream that follows a job reads each report once, not the whole file each time)."""
        cursor = cursor or EventCursor()
        path = self._folder(job_id) / EVENTS_FILE
        try:
            with path.open("rb") as file:
                file.seek(cursor.offset)
                data = file.read()
        except FileNotFoundError:
            return []
        events = []
        end = data.rfind(b"\n") + 1  # whole lines only: the last may be being written
        for line in data[:end].splitlines():
            cursor.count += 1
            if cursor.count <= after:
                continue
            try:
                events.append({"n": cursor.count, **json.loads(line)})
            except ValueError:
                log.warning("job %s: report %d is not JSON; skipped", job_id, cursor.count)
        cursor.offset += end
        return events

    def _recover(self) -> None:
        """Mark the jobs a server left queued or running (it stopped, or crashed) as failed,
        and remove their half-made artifacts' staging folders."""
        left = [j for j in self.list() if not j.ended]
        for job in left:
            job.state, job.finished_at = "failed", _now()
            job.error = "the server stopped while it " + (
                "ran" if job.started_at else "waited to run"
            )
            _write_job(self.root / job.id, job)
            log.warning("job %s: %s", job.id, job.error)
        if left:
            self.artifacts.sweep()

    # -- starting --------------------------------------------------------------------------

    def check(self, request: JobRequest) -> None:
        """Everything the job will need, checked before it starts: its artifact, strategy,
        options, data, recipe, and plugins a job process can import."""
        self.artifacts.get(request.artifact)
        if request.id is not None:
            check_artifact_id(request.id)
        strategies: list[str] = []
        if request.strategy is not None:
            try:
                record = self.manager.get(OptimizationStrategy, request.strategy)
            except UnknownName as exc:
                raise InvalidInput("job", [f"{exc} @ $.strategy"]) from None
            structure_options(record, request.options, where="$.options")
            if request.data is not None:
                read_data(self.data_dir, request.data, "$.data", confined=True)
            strategies.append(record.name)
        else:
            loaded = self._recipe(request)
            strategies += [step.strategy for step in loaded.recipe.steps]
        providers = self.manager.providers(OptimizationStrategy)
        importable = {p["name"] for p in importable_plugins(self.manager)}
        for name in strategies:
            info = providers[name.strip().lower()]
            if not info.builtin and info.name not in importable:
                raise InvalidInput(
                    "job",
                    [
                        f"strategy {name!r} comes from plugin {info.name!r}, registered in the "
                        "server as an object, which a job's process cannot import; register "
                        "a module"
                    ],
                )

    def _recipe(self, request: JobRequest) -> LoadedRecipe:
        return recipe_of(self.manager, request, self.data_dir, self.recipes_dir)

    def submit(self, request: JobRequest, *, by: str = "config") -> Job:
        """Check ``request``, record it as a job and start it (or queue it)."""
        self._check_owner()
        self.check(request)
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down; no new job starts")
            job = Job(id=self._new_id(), request=request, by=by)
            folder = self.root / job.id
            folder.mkdir(parents=True)
            _write_job(folder, job)
            self._schedule()
        return self.get(job.id)

    def _new_id(self) -> str:
        while True:
            job_id = f"{_now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            if not (self.root / job_id).exists():
                return job_id

    def _schedule(self) -> None:
        """Start the oldest queued jobs while fewer than ``max_running`` run (under the lock)."""
        if self._closed:
            return
        waiting = [j for j in reversed(self.list()) if j.state == "queued"]
        for job in waiting[: max(self.max_running - len(self._processes), 0)]:
            self._start(job)

    def _start(self, job: Job) -> None:
        folder = self.root / job.id
        write_json_atomic(
            folder / LAUNCH_FILE,
            {
                "artifacts": str(self.artifacts.root),
                "data": str(self.data_dir),
                "recipes": str(self.recipes_dir),
                "plugins": importable_plugins(self.manager),
            },
        )
        with open(folder / LOG_FILE, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "gptstore.optimization.jobs", str(folder)],
                stdin=subprocess.PIPE,  # its end of file tells the job the server is gone
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._processes[job.id] = process
        job.state, job.pid = "running", process.pid
        _write_job(folder, job)
        threading.Thread(
            target=self._watch, args=(job.id, process), name=f"job-{job.id}", daemon=True
        ).start()

    def _watch(self, job_id: str, process: subprocess.Popen[bytes]) -> None:
        """Wait for the job's process; record how it ended if it could not (it was killed)."""
        code = process.wait()
        with self._lock:
            self._processes.pop(job_id, None)
            why = self._cancelling.pop(job_id, None)
            folder = self.root / job_id
            job = _read_job(folder)
            if not job.ended:
                job.state = "cancelled" if why else "failed"
                job.error = (
                    f"{why}; it did not stop within {GRACE:g} s and was killed"
                    if why
                    else f"its process exited with status {code} (see {LOG_FILE} in its folder)"
                )
                job.finished_at = _now()
                _write_job(folder, job)
                self.artifacts.sweep()  # its staging folder, unlocked by its death
            elif job.state == "cancelled" and why and job.error != why:
                job.error = why
                _write_job(folder, job)
            if process.stdin is not None:
                process.stdin.close()
            self._schedule()

    # -- cancelling ------------------------------------------------------------------------

    def cancel(self, job_id: str, *, why: str = "cancelled") -> Job:
        """Stop a queued or running job (a running one gets :data:`GRACE` seconds, then is
        killed); Conflict when it has ended."""
        folder = self._folder(job_id)
        self._check_owner()
        with self._lock:
            job = _read_job(folder)
            if job.ended:
                raise Conflict(f"job {job_id} has already ended ({job.state})")
            process = self._processes.get(job_id)
            if process is None:  # queued
                job.state, job.error, job.finished_at = "cancelled", why, _now()
                _write_job(folder, job)
                return job
            self._cancelling[job_id] = why
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until its watcher has recorded the end
            job = _read_job(folder)
            with self._lock:
                if job.ended and job_id not in self._processes:
                    return job
            time.sleep(0.05)
        return _read_job(folder)

    def close(self) -> None:
        """Cancel every job (the server stops): queued ones at once, running ones as
        :meth:`cancel` does, all at the same time."""
        with self._lock:
            self._closed = True
            if self._owner is None:
                return
            pending = [j.id for j in self.list() if not j.ended]
        threads = [
            threading.Thread(target=self._cancel_quietly, args=(job_id,)) for job_id in pending
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with self._lock:
            owner, self._owner = self._owner, None
            if owner is not None:
                os.close(owner)  # the next server may run this store's jobs

    def _cancel_quietly(self, job_id: str) -> None:
        with contextlib.suppress(GptstoreError):
            self.cancel(job_id, why="cancelled: the server stopped")


def recipe_of(
    manager: PluginManager, request: JobRequest, data_dir: Path, recipes_dir: Path
) -> LoadedRecipe:
    """The recipe a job runs, checked: sent with it, or read from ``recipes_dir``."""
    if request.recipe is not None:
        return check_recipe(
            manager, request.recipe, what="$.recipe", path=Path("recipe"), data_root=data_dir
        )
    name = request.recipe_file or ""
    if not _RECIPE_NAME.match(name) or ".." in name:
        raise InvalidInput(
            "$.recipe_file", [f"{name!r}: the name of a file in $GPTSTORE_HOME/recipes"]
        )
    path = recipes_dir / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        raise InvalidInput("$.recipe_file", [f"{name!r}: no such recipe in $GPTSTORE_HOME/recipes"])
    return load_recipe(manager, path)


# -- the job's process ---------------------------------------------------------------------------


class _Reporter:
    """The job's progress: every report appended to its events, its record rewritten at most
    every :data:`RECORD_EVERY` seconds."""

    def __init__(self, folder: Path, job: Job) -> None:
        self.folder = folder
        self.job = job
        self._written = 0.0
        self._lock = threading.Lock()

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            self.job.progress = min(max(float(fraction), 0.0), 1.0)
            self.job.message = message
            self.job.events += 1
            event = {"at": _now().isoformat(), "progress": self.job.progress, "message": message}
            with open(self.folder / EVENTS_FILE, "a", encoding="utf-8") as events:
                events.write(json.dumps(event) + "\n")
            if time.monotonic() - self._written >= RECORD_EVERY:
                self.save()

    def save(self) -> None:
        _write_job(self.folder, self.job)
        self._written = time.monotonic()


#: Set in a job's process when its server is gone.
_SERVER_GONE = threading.Event()


def _lock_jobs(jobs_dir: Path) -> int | None:
    """An exclusive lock on ``jobs_dir/.server.lock`` for this process's lifetime (its file
    descriptor), or None when another process holds it."""
    import fcntl

    jobs_dir.mkdir(parents=True, exist_ok=True)
    handle = os.open(jobs_dir / ".server.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(handle)
        return None
    return handle


def _watch_server(cancel: threading.Event) -> None:
    """The server holds this process's standard input: at its end, the server is gone; cancel,
    and leave if the step does not stop."""
    try:
        while sys.stdin.buffer.read(1 << 12):
            pass
    except OSError:
        pass
    _SERVER_GONE.set()
    cancel.set()
    time.sleep(GRACE)
    os._exit(3)


def run_job(folder: Path, cancel: threading.Event) -> Job:
    """Run the job recorded in ``folder`` (in this process) and record how it ended."""
    launch = json.loads((folder / LAUNCH_FILE).read_text(encoding="utf-8"))
    job = _read_job(folder)
    job.state, job.started_at, job.pid = "running", _now(), os.getpid()
    report = _Reporter(folder, job)
    report.save()
    request = job.request
    try:
        manager = plugins_of(launch["plugins"])
        store = ArtifactStore(Path(launch["artifacts"]))
        if request.strategy is not None:
            data: Dataset | None = None
            if request.data is not None:
                data = read_data(Path(launch["data"]), request.data, "$.data", confined=True)
            made = optimize(
                manager,
                store,
                request.artifact,
                request.strategy,
                request.options,
                data=data,
                progress=report,
                cancel=cancel,
                new_id=request.id,
            )
            job.result = made.id
        else:
            loaded = recipe_of(manager, request, Path(launch["data"]), Path(launch["recipes"]))
            run = run_recipe(
                manager,
                store,
                loaded,
                request.artifact,
                progress=report,
                cancel=cancel,
                report_dir=folder,
                final_id=request.id,
            )
            job.result, job.report = run.final, unstructure(run)
        job.state, job.progress = "succeeded", 1.0
    except BaseException as exc:
        if isinstance(exc, RecipeStopped):
            job.report = unstructure(exc.run)
        if _SERVER_GONE.is_set():
            job.state, job.error = "failed", "the server stopped while it ran"
        elif cancel.is_set() or isinstance(exc, Cancelled):
            job.state, job.error = "cancelled", "cancelled"
        else:
            job.state = "failed"
            if isinstance(exc, GptstoreError):
                why = str(exc)
            else:
                why = f"{type(exc).__name__}: {exc}"
                log.exception("job %s failed", job.id)
            # What the API shows names the store's places, not the server's disk (the full
            # text is in the job's log).
            job.error = scrub(why, folder.parent.parent)
        if not isinstance(exc, Exception):
            raise
    finally:
        job.finished_at = _now()
        with report._lock:
            report.save()
    return job


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    # Ctrl-C in the server's terminal reaches its whole process group: the server decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_server, args=(cancel,), daemon=True).start()
    job = run_job(folder, cancel)
    log.info("job %s %s%s", job.id, job.state, f": {job.error}" if job.error else "")
    return 0 if job.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
