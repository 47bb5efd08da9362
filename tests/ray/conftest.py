"""The Ray cluster of the ray engine's tests: one head on 127.0.0.1 for the session
(:func:`gptstore.testing.ray.ray_head`), and stores whose server runs the ray engine on it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from gptstore.testing.echo import echo_artifact
from gptstore.testing.ray import ray_head

ADMIN = "ray-admin"

if importlib.util.find_spec("ray") is None:
    pytest.skip(
        "the ray engine's tests need Ray Serve: pip install 'gptstore[ray]'",
        allow_module_level=True,
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address (127.0.0.1:PORT) of a running Ray head with 2 CPUs."""
    with ray_head() as address:
        yield address


@pytest.fixture
def echo_home(tmp_path, fake_dist, ray_cluster) -> Callable[..., tuple[Path, dict[str, str]]]:
    """``echo_home(deployments, **ray)`` -> (home, env): a store with the echo artifact whose
    server runs the ray engine on the session's cluster (each replica reserving 0.25 CPU)."""
    site = fake_dist("gptstore-echo", {"echo": "gptstore.testing.echo"}, {})

    def make(deployments: dict[str, object], **ray: object) -> tuple[Path, dict[str, str]]:
        home = tmp_path / "home"
        echo_artifact(home / "artifacts")
        settings = {"address": ray_cluster, "replica_cpus": 0.25, **ray}
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "server": {
                        "api_keys": [{"key": ADMIN, "role": "admin"}],
                        "engine": "ray",
                        "ray": settings,
                    },
                    "deployments": deployments,
                }
            )
        )
        env = {
            "GPTSTORE_HOME": str(home),
            "PYTHONPATH": str(site),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
        }
        return home, env

    return make
