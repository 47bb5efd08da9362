"""`gptstore quickstart` where it cannot run: it names what is missing and how to install it, and
`--stop` with no server says so. (tests/test_quickstart.py runs the whole of it on SmolLM2.)"""

from __future__ import annotations

import importlib.util

import pytest

from gptstore.testing import run_cli


@pytest.mark.skipif(
    importlib.util.find_spec("gptstore_lora") is not None, reason="gptstore-lora is installed"
)
def test_the_quickstart_names_what_it_needs(tmp_path):
    done = run_cli("quickstart", env={"GPTSTORE_HOME": str(tmp_path / "home")})
    assert done.returncode == 1
    assert "the quickstart needs" in done.stderr
    assert "-e plugins/lora" in done.stderr
    assert "pip install -c constraints.txt" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "artifacts").exists()  # nothing was started


def test_stopping_without_a_quickstart_server_says_so(tmp_path):
    done = run_cli("quickstart", "--stop", env={"GPTSTORE_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "no quickstart server is running" in done.stdout
