"""A Ray cluster of one head on 127.0.0.1, for the ray engine's tests and benchmark: started by
``ray start --head`` of this Python's environment (so its workers import the same gptstore),
with no dashboard and no usage reporting, under a short temporary folder (Ray's socket paths must
stay under 108 bytes), and stopped with SIGTERM to its process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptstore.testing import free_port


def ray_env() -> dict[str, str]:
    """The environment for Ray's commands and the servers that join the test head: no usage
    reporting, no native crash handler, no token authentication."""
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
        # A head on 127.0.0.1 for tests: no token, whatever ~/.ray holds.
        "RAY_AUTH_MODE": "disabled",
    }


@contextmanager
def ray_head(cpus: int = 2, timeout: float = 120) -> Iterator[str]:
    """A running head with ``cpus`` CPUs; yields its address, ``127.0.0.1:PORT``."""
    ray = Path(sys.executable).with_name("ray")
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="gr", dir="/tmp"))
    log_path = temp / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [
                str(ray),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={cpus}",
                "--object-store-memory=134217728",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            env=ray_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        address = f"127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if head.poll() is not None:
                    told = log_path.read_text()
                    raise RuntimeError(f"ray start exited {head.returncode}: {told}")
                status = subprocess.run(
                    [str(ray), "status", f"--address={address}"],
                    env=ray_env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if status.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not come up: {status.stderr[-2000:]}")
                time.sleep(1)
            yield address
        finally:
            if head.poll() is None:
                os.killpg(head.pid, signal.SIGTERM)
                try:
                    head.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(head.pid, signal.SIGKILL)
                    head.wait()
            shutil.rmtree(temp, ignore_errors=True)


def serve_apps(address: str) -> list[str]:
    """The Serve applications running on the cluster, as a separate Ray driver sees them."""
    return list(json.loads(_driver(address, "sorted(serve.status().applications)")))


def delete_app(address: str, app: str) -> None:
    """Delete Serve application ``app`` from a separate Ray driver (behind its server's back)."""
    _driver(address, f"serve.delete({app!r})")


def _driver(address: str, expression: str) -> str:
    """What ``expression`` gives, as JSON, evaluated by a Ray driver of its own process."""
    code = (
        "import json, ray; from ray import serve; "
        f"ray.init(address={address!r}, log_to_driver=False); "
        f"print(json.dumps({expression}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=ray_env(), capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"a Ray driver failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
