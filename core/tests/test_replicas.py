"""Replica processes behind the router, on a real server: routing, a replica killed under load,
restarts, exact outstanding counts, loads that fail or crash, no orphans."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

import gptstore.testing.echo
from gptstore.deploy.ray_engine import RayEngine, RaySettings
from gptstore.errors import InvalidInput, Unavailable
from gptstore.manager import make_plugin_manager
from gptstore.server import create_app
from gptstore.testing import free_port, run_cli, running_server
from gptstore.testing.echo import echo_artifact

ADMIN = "admin-key"


def _home(tmp_path, deployments):
    home = tmp_path / "home"
    echo_artifact(home / "artifacts")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {"server": {"api_keys": [{"key": ADMIN, "role": "admin"}]}, "deployments": deployments}
        )
    )
    return home


def _manager():
    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    return manager


def call(base, method, path, body=None, timeout=60):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    connection.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = data.decode()
    return response.status, parsed


def complete(base, prompt="one two three four five", model="echo", **extra):
    return call(
        base,
        "POST",
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 5, **extra},
    )


def status(base, name="echo"):
    code, body = call(base, "GET", f"/store/deployments/{name}")
    assert code == 200, body
    return body


def wait_until(check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


@pytest.fixture
def served(tmp_path):
    home = _home(
        tmp_path,
        {
            "echo": {
                "artifact": "echo",
                "backend": "echo",
                "replicas": 2,
                "options": {"word_delay": 0.01},
            }
        },
    )
    with running_server(create_app(home, manager=_manager())) as base:
        yield base


def test_requests_are_spread_over_replica_processes(served):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: complete(served), range(40)))
    assert all(code == 200 for code, _ in answers)
    assert {body["choices"][0]["text"] for _, body in answers} == {"one two three four five"}
    replicas = status(served)["replicas"]
    assert [r["state"] for r in replicas] == ["ready", "ready"]
    pids = {r["pid"] for r in replicas}
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert sum(r["served"] for r in replicas) == 40
    assert all(r["served"] > 0 for r in replicas)  # both took a share
    assert all(r["outstanding"] == 0 for r in replicas)
    code, ready = call(served, "GET", "/ready")
    assert (code, ready["deployments"]) == (200, {"echo": {"version": 1, "replicas": {"ready": 2}}})
    code, text = call(served, "GET", "/metrics")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def sample(name, **labels):
        return samples[
            (name, tuple(sorted({"deployment": "echo", "version": "1", **labels}.items())))
        ]

    assert sample("gptstore:requests_total", status="200") == 40
    assert sample("gptstore:prompt_tokens_total") == 40 * 5
    assert sample("gptstore:generation_tokens_total") == 40 * 5
    assert sample("gptstore:e2e_request_latency_seconds_count") == 40
    assert sample("gptstore:replicas", state="ready") == 2
    assert sample("gptstore:replicas", state="dead") == 0
    assert sample("gptstore:num_requests_running") == 0


def test_a_replica_killed_under_load_fails_no_request_and_comes_back(served):
    victim = status(served)["replicas"][0]
    done = []

    def client(index):
        results = []
        for _ in range(15):
            results.append(complete(served, prompt=f"w{index} a b c d")[0])
            done.append(1)
        return results

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        wait_until(lambda: len(done) >= 30)
        os.kill(victim["pid"], signal.SIGKILL)
        codes = [code for future in futures for code in future.result()]
    assert codes == [200] * 120  # the calls on the killed replica were retried on the other

    def back():
        replica = status(served)["replicas"][0]
        return replica["state"] == "ready" and replica["pid"] != victim["pid"]

    wait_until(back)
    replica = status(served)["replicas"][0]
    assert replica["restarts"] == 1
    assert all(r["outstanding"] == 0 for r in status(served)["replicas"])
    assert complete(served)[0] == 200


def test_outstanding_counts_stay_exact_through_errors_and_disconnects(served):
    # 400s raised inside a replica, and streams whose clients leave after the first chunk.
    for _ in range(5):
        code, body = complete(served, max_tokens=-1)
        assert code == 400, body
    url = urllib.parse.urlsplit(served)
    for _ in range(5):
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        body = {"model": "echo", "prompt": "a " * 200, "max_tokens": 200, "stream": True}
        connection.request(
            "POST",
            "/v1/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first event, then the client goes away
        connection.close()
    wait_until(lambda: all(r["outstanding"] == 0 for r in status(served)["replicas"]))


def test_replicas_stop_with_the_server(tmp_path):
    home = _home(tmp_path, {"echo": {"artifact": "echo", "backend": "echo", "replicas": 2}})
    with running_server(create_app(home, manager=_manager())) as base:
        pids = [r["pid"] for r in status(base)["replicas"]]
        assert complete(base)[0] == 200
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("load", "says"),
    [
        ("error", "the echo backend was told to refuse it"),
        ("crash", "its process exited with status 70 while loading"),
    ],
)
def test_a_replica_that_fails_to_load_stops_the_server_start_with_its_cause(tmp_path, load, says):
    import asyncio
    import threading

    from gptstore.config import Store
    from gptstore.deploy import Deployments
    from gptstore.server.app import load_deployments
    from gptstore.server.settings import server_config

    home = _home(
        tmp_path,
        {"bad": {"artifact": "echo", "backend": "echo", "replicas": 2, "options": {"load": load}}},
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        from gptstore.artifacts import ArtifactStore

        deployments = Deployments(_manager(), ArtifactStore(home / "artifacts"), loop=loop)
        with pytest.raises(InvalidInput) as caught:
            load_deployments(server_config(Store(home)), deployments)
        assert says in str(caught.value)
        assert "[deployments.bad]" in str(caught.value)
        assert deployments.list() == []
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def test_in_process_deployments_are_counted_in_the_metrics_too(tmp_path):
    home = _home(tmp_path, {"echo": {"artifact": "echo", "backend": "echo", "isolation": "none"}})
    with running_server(create_app(home, manager=_manager())) as base:
        for _ in range(3):
            assert complete(base)[0] == 200
        assert complete(base, stream=True)[0] == 200
        assert complete(base, logprobs=1)[0] == 400  # refused by the deployment: echo has none
        _, text = call(base, "GET", "/metrics")
    samples = {
        (s.name, s.labels.get("status")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("deployment") == "echo" and s.labels.get("version") == "1"
    }
    assert samples[("gptstore:requests_total", "200")] == 4
    assert samples[("gptstore:requests_total", "400")] == 1
    assert samples[("gptstore:e2e_request_latency_seconds_count", None)] == 4
    assert samples[("gptstore:time_to_first_token_seconds_count", None)] == 1
    assert samples[("gptstore:generation_tokens_total", None)] == 4 * 5


def test_an_in_process_deployment_of_several_replicas_is_refused(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        spec = {"name": "many", "artifact": "echo", "backend": "echo", "isolation": "none"}
        code, body = call(base, "POST", "/store/deployments", {**spec, "replicas": 3})
        assert code == 400, body
        assert 'set replicas = 1, or isolation = "process" @ $.replicas' in str(body)
        assert call(base, "POST", "/store/deployments", spec)[0] == 201


def test_autoscaling_is_refused_by_the_local_engine_with_what_to_do(tmp_path):
    scaling = {"min_replicas": 1, "max_replicas": 3}
    spec = {"artifact": "echo", "backend": "echo", "autoscaling": scaling}
    home = _home(tmp_path, {"scaled": spec})
    with pytest.raises(InvalidInput) as refused:
        create_app(home, manager=_manager())
    assert "autoscaling needs the ray engine" in str(refused.value)
    assert "$.deployments.scaled.autoscaling" in str(refused.value)
    home = _home(tmp_path / "api", {})
    with running_server(create_app(home, manager=_manager())) as base:
        code, body = call(base, "POST", "/store/deployments", {"name": "scaled", **spec})
        assert code == 400, body
        assert "autoscaling needs the ray engine" in str(body)
        bad = {**spec, "autoscaling": {"min_replicas": 3, "max_replicas": 2}}
        code, body = call(base, "POST", "/store/deployments", {"name": "scaled", **bad})
        assert code == 400, body
        assert "max_replicas (2) is below min_replicas (3) @ $.autoscaling" in str(body)


def test_the_ray_engine_without_ray_says_what_to_install(tmp_path):
    if importlib.util.find_spec("ray") is not None:
        pytest.skip("Ray is installed here (tests/ray covers the engine)")
    with pytest.raises(Unavailable, match=r"pip install 'gptstore\[ray\]'"):
        RayEngine(RaySettings()).connect()
    env = {"GPTSTORE_HOME": str(tmp_path / "home")}
    done = run_cli("serve", "--engine", "ray", "--port", str(free_port()), env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "gptstore serve cannot start: the ray engine needs Ray Serve" in done.stderr
