"""Fixtures of the reliability suite."""

from __future__ import annotations

import pytest
import tomli_w

from gptstore.testing.echo import echo_artifact

ADMIN = "reliability-admin"


@pytest.fixture
def make_home(tmp_path, fake_dist):
    site = fake_dist("gptstore-echo", {"echo": "gptstore.testing.echo"}, {})

    def make(deployments):
        home = tmp_path / "home"
        echo_artifact(home / "artifacts")
        (home / "config.toml").write_text(
            tomli_w.dumps(
                {
                    "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                    "deployments": deployments,
                }
            )
        )
        return home, site

    return make
