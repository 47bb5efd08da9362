"""Versions of a deployment on a real server: live swaps under load, failed swaps that leave the
live version serving, canaries, rollback, and records that survive a restart."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptstore.server import create_app
from gptstore.testing import running_server

from .test_replicas import ADMIN, _home, _manager, call, complete, status, wait_until

PROMPT = "one two three four five"
OLD, NEW = PROMPT, PROMPT.upper()  # the new version answers in capitals


def echo(**options):
    return {"artifact": "echo", "backend": "echo", "replicas": 2, "options": options}


def put(base, spec, name="echo"):
    return call(base, "PUT", f"/store/deployments/{name}", spec, timeout=120)


def metric_samples(base):
    """/metrics as {(name, version or outcome, status): value} for the echo deployment."""
    from prometheus_client.parser import text_string_to_metric_families

    code, text = call(base, "GET", "/metrics")
    assert code == 200
    return {
        (
            sample.name,
            *(sample.labels[k] for k in ("version", "outcome", "status") if k in sample.labels),
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("deployment") == "echo"
    }


def _capped(tmp_path, max_replicas):
    """A home with deployment echo (2 replicas) on a server of ``max_replicas``."""
    home = _home(tmp_path, {"echo": echo()})
    config = home / "config.toml"
    text = config.read_text().replace("[server]", f"[server]\nmax_replicas = {max_replicas}", 1)
    config.write_text(text)
    return home


@pytest.fixture
def served(tmp_path):
    home = _home(tmp_path, {"echo": echo(word_delay=0.002)})
    with running_server(create_app(home, manager=_manager())) as base:
        yield base, home


def load(base, stop, answers, stream=False):
    """Requests until ``stop`` is set; each answer's status and text into ``answers``."""
    while not stop.is_set():
        code, body = complete(base, stream=stream) if stream else complete(base)
        if stream:
            text = "".join(
                json.loads(line[6:])["choices"][0]["text"]
                for line in (body if isinstance(body, str) else "").splitlines()
                if line.startswith("data: {")
            )
        else:
            text = body["choices"][0]["text"] if code == 200 else body
        answers.append((code, text))


def test_a_live_swap_under_load_fails_no_request(served):
    base, _home = served
    before = {r["pid"] for r in status(base)["replicas"]}
    stop, answers = threading.Event(), []
    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(load, base, stop, answers, i % 2 == 1) for i in range(8)]
        while len(answers) < 100:
            threading.Event().wait(0.01)
        code, body = put(base, echo(word_delay=0.002, uppercase=True))
        seen = len(answers)
        while len(answers) < seen + 100:
            threading.Event().wait(0.01)
        stop.set()
        for client in clients:
            client.result()
    assert code == 200, body
    assert body["version"] == 2
    assert [(v["version"], v["outcome"]) for v in body["versions"]] == [
        (1, "replaced"),
        (2, "live"),
    ]
    assert body["versions"][1]["by"].startswith("key sha256:")
    failed = [a for a in answers if a[0] != 200]
    assert failed == []
    assert {text for _, text in answers} == {OLD, NEW}  # every answer from one version or the other
    assert answers[-1][1] == NEW
    counted = metric_samples(base)
    answered = {
        version: counted.get(("gptstore:requests_total", version, "200"), 0)
        for version in ("1", "2")
    }
    assert answered["1"] + answered["2"] == len(answers)  # each request counted once, by version
    assert answered["1"] > 0
    assert answered["2"] > 0
    assert counted[("gptstore:swaps_total", "swapped")] == 1
    for pid in before:  # the old version's replicas stopped once their calls were done
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"load": "crash"}, "exited with status 70 while loading"),
        ({"load": "error"}, "told to refuse it"),
        ({"load": "broken"}, "failed a probe"),
    ],
)
def test_a_failed_swap_leaves_the_live_version_serving(served, options, says):
    base, _home = served
    stop, answers = threading.Event(), []
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(load, base, stop, answers) for _ in range(4)]
        code, body = put(base, echo(**options))
        stop.set()
        for client in clients:
            client.result()
    assert code == 422, body
    assert says in body["error"]["message"]
    assert "version 1 still serves" in body["error"]["message"]
    assert [a for a in answers if a != (200, OLD)] == []
    state = status(base)
    assert state["version"] == 1
    assert state["swap"]["state"] == "failed"
    assert state["versions"][-1]["outcome"].startswith("failed: ")
    assert [r["state"] for r in state["replicas"]] == ["ready", "ready"]  # v2's are gone
    assert metric_samples(base)[("gptstore:swaps_total", "failed")] == 1


def test_a_canary_takes_its_share_until_promoted_or_rolled_back(served):
    base, _home = served
    code, body = put(base, {**echo(uppercase=True), "canary": 50})
    assert code == 200, body
    assert body["canary"] == {"version": 2, "percent": 50}
    assert body["version"] == 1
    texts = [complete(base)[1]["choices"][0]["text"] for _ in range(60)]
    assert OLD in texts
    assert NEW in texts
    code, body = put(base, echo())
    assert code == 409  # one change at a time: the canary first
    code, body = call(base, "POST", "/store/deployments/echo/rollback")
    assert code == 200, body
    assert body["canary"] is None
    assert {complete(base)[1]["choices"][0]["text"] for _ in range(10)} == {OLD}
    code, body = put(base, {**echo(uppercase=True), "canary": 10})
    assert (code, body["canary"]["version"]) == (200, 3)
    code, body = call(base, "POST", "/store/deployments/echo/promote")
    assert (code, body["version"], body["canary"]) == (200, 3, None)
    assert {complete(base)[1]["choices"][0]["text"] for _ in range(10)} == {NEW}
    outcomes = [(v["version"], v["outcome"]) for v in status(base)["versions"]]
    assert outcomes == [(1, "replaced"), (2, "rolled back"), (3, "live")]


def test_rollback_returns_to_the_previous_version(served):
    base, _home = served
    assert put(base, echo(uppercase=True))[0] == 200
    assert complete(base)[1]["choices"][0]["text"] == NEW
    code, body = call(base, "POST", "/store/deployments/echo/rollback")
    assert code == 200, body
    assert body["version"] == 3
    assert body["versions"][-1]["outcome"] == "live (rolled back to version 1)"
    assert complete(base)[1]["choices"][0]["text"] == OLD


def test_deployments_made_through_the_api_survive_a_restart(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        code, body = put(base, echo(), name="made")
        assert (code, body["version"]) == (201, 1), body
        assert put(base, echo(uppercase=True), name="made")[0] == 200
    record = json.loads((home / "deployments" / "made.json").read_text())
    assert record["version"] == 2
    with running_server(create_app(home, manager=_manager())) as base:
        state = status(base, "made")
        assert state["version"] == 2
        assert [v["outcome"] for v in state["versions"]] == ["replaced", "live"]
        assert complete(base, model="made")[1]["choices"][0]["text"] == NEW
        assert call(base, "DELETE", "/store/deployments/made")[0] == 204
    assert not (home / "deployments" / "made.json").exists()
    with running_server(create_app(home, manager=_manager())) as base:
        assert call(base, "GET", "/store/deployments/made")[0] == 404


def test_a_swap_cannot_exceed_max_replicas(tmp_path):
    home = _capped(tmp_path, 3)
    with running_server(create_app(home, manager=_manager())) as base:
        code, body = put(base, echo())
        assert code == 409
        assert "max_replicas" in body["error"]["message"]
        assert status(base)["version"] == 1
        assert call(base, "PUT", "/store/deployments/echo", {**echo(), "replicas": 1})[0] == 200


def test_gptstore_deploy_swaps_canaries_and_rolls_back_a_running_server(served):
    from gptstore.testing import run_cli

    base, _home = served
    env = {"GPTSTORE_API_KEY": ADMIN, "GPTSTORE_SERVER": base}
    done = run_cli("deploy", "echo", "echo", "--option", "uppercase=true", env=env)
    assert done.returncode == 0, done.stderr
    assert "echo: version 2 live" in done.stdout
    assert "v1  echo on echo  replaced" in done.stdout
    assert status(base)["versions"][-1]["spec"]["replicas"] == 2  # kept from the live version
    assert complete(base)[1]["choices"][0]["text"] == NEW

    done = run_cli("deploy", "echo", "echo", "--canary", "25", env=env)
    assert done.returncode == 0, done.stderr
    assert "version 3 canary at 25%" in done.stdout
    done = run_cli("deploy", "echo", "--rollback", env=env)
    assert done.returncode == 0, done.stderr
    assert "v3  echo on echo  rolled back" in done.stdout

    failed = run_cli("deploy", "echo", "echo", "--option", 'load="crash"', env=env)
    assert failed.returncode == 1
    assert "422" in failed.stderr
    assert "version 2 still serves" in failed.stderr
    assert "Traceback" not in failed.stderr

    nobody = run_cli("deploy", "echo", "echo", "--server", "http://127.0.0.1:9", env=env)
    assert nobody.returncode == 1
    assert "cannot reach the server" in nobody.stderr


# -- changes that meet: a delete, a second change, a restart, a long history --------------------


def _wait_for_swap_state(base, state, name="echo"):
    from .test_replicas import wait_until

    wait_until(lambda: status(base, name)["swap"]["state"] == state)


def test_a_delete_during_a_swaps_load_ends_the_swap_and_the_deployment_stays_deleted(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        assert put(base, echo())[0] == 201
        with ThreadPoolExecutor(1) as pool:
            swapping = pool.submit(put, base, echo(load_delay=30, uppercase=True))
            _wait_for_swap_state(base, "loading")
            assert call(base, "DELETE", "/store/deployments/echo", timeout=20)[0] == 204
            code, body = swapping.result(timeout=20)  # its replicas were stopped mid-load
        assert code == 503, body
        assert "deleted while its version 2 loaded" in body["error"]["message"]
        assert call(base, "GET", "/store/deployments/echo")[0] == 404
        assert call(base, "GET", "/store/deployments")[1] == []
    assert not (home / "deployments" / "echo.json").exists()
    with running_server(create_app(home, manager=_manager())) as base:
        assert call(base, "GET", "/store/deployments/echo")[0] == 404


def test_a_refused_second_change_does_not_free_the_first_ones_replicas(tmp_path):
    home = _capped(tmp_path, 4)
    with running_server(create_app(home, manager=_manager())) as base:
        with ThreadPoolExecutor(1) as pool:
            swapping = pool.submit(put, base, echo(load_delay=3, uppercase=True))
            _wait_for_swap_state(base, "loading")  # 2 live + 2 loading: the server is full
            for path in ("/store/deployments/echo/promote", "/store/deployments/echo/rollback"):
                code, body = call(base, "POST", path)
                assert code == 409, body
                assert "changing versions (loading)" in body["error"]["message"]
            code, body = put(base, echo())
            assert code == 409, body
            code, body = put(base, {**echo(), "replicas": 1}, name="other")
            assert code == 409, body  # still full: the refused changes freed nothing
            assert "max_replicas" in body["error"]["message"]
            assert swapping.result(timeout=60)[0] == 200
        code, body = put(base, {**echo(), "replicas": 1}, name="other")
        assert code == 201, body  # v1's replicas stopped: 3 of 4 now


def test_a_rollback_that_would_exceed_max_replicas_is_refused(tmp_path):
    home = _capped(tmp_path, 3)
    with running_server(create_app(home, manager=_manager())) as base:
        assert put(base, {**echo(uppercase=True), "replicas": 1})[0] == 200  # 2 + 1 while it swaps
        assert put(base, {**echo(), "replicas": 1}, name="other")[0] == 201  # 1 + 1 now
        code, body = call(base, "POST", "/store/deployments/echo/rollback")
        assert code == 409, body  # version 1 runs 2 replicas: 2 + 2 > 3
        assert "max_replicas" in body["error"]["message"]
        state = status(base)
        assert (state["version"], len(state["replicas"])) == (2, 1)
        assert call(base, "DELETE", "/store/deployments/other")[0] == 204
        code, body = call(base, "POST", "/store/deployments/echo/rollback")
        assert (code, body["version"]) == (200, 3), body


def test_a_rollback_never_returns_to_a_rejected_canary(served):
    base, _home = served
    assert put(base, {**echo(uppercase=True), "canary": 50})[0] == 200
    assert call(base, "POST", "/store/deployments/echo/rollback")[0] == 200  # v2 rejected
    assert put(base, echo(context_length=100))[0] == 200  # v3 live, v1 replaced
    code, body = call(base, "POST", "/store/deployments/echo/rollback")
    assert code == 200, body
    assert body["versions"][-1]["outcome"] == "live (rolled back to version 1)"
    assert complete(base)[1]["choices"][0]["text"] == OLD
    counted = metric_samples(base)
    assert counted[("gptstore:swaps_total", "swapped")] == 1  # the rollback counted once
    assert counted[("gptstore:swaps_total", "rolled_back")] == 2


def test_a_delete_while_a_replica_restarts_stops_it_at_once(tmp_path):
    from .test_replicas import wait_until

    home = _home(tmp_path, {"echo": {**echo(load_delay=2), "replicas": 1}})
    with running_server(create_app(home, manager=_manager())) as base:
        pid = status(base)["replicas"][0]["pid"]
        os.kill(pid, 9)
        wait_until(lambda: status(base)["replicas"][0]["pid"] != pid)  # restarting, loading 2 s
        restarting = status(base)["replicas"][0]
        assert restarting["state"] == "starting"
        assert call(base, "DELETE", "/store/deployments/echo", timeout=20)[0] == 204
        with pytest.raises(ProcessLookupError):
            os.kill(restarting["pid"], 0)  # killed and reaped, not left loading


def test_a_long_history_keeps_the_live_version(served, monkeypatch):
    import gptstore.deploy.router

    monkeypatch.setattr(gptstore.deploy.router, "HISTORY", 3)
    base, _home = served
    for _ in range(4):
        assert put(base, echo(load="error"))[0] == 422
    state = status(base)
    assert [v["version"] for v in state["versions"]] == [1, 4, 5]
    assert state["versions"][0]["outcome"] == "live"
    code, body = call(base, "POST", "/store/deployments/echo/promote")
    assert code == 409, body
    assert "no canary" in body["error"]["message"]


def test_while_the_old_version_drains_the_new_one_counts_once_against_max_replicas(tmp_path):
    """Review finding: the new version's reservation was held until the old version had drained
    (up to 120 s), so it counted twice and other deployments got a false 409."""
    home = _home(tmp_path, {"echo": {**echo(word_delay=1.0), "replicas": 1}})
    config = home / "config.toml"
    config.write_text(config.read_text().replace("[server]", "[server]\nmax_replicas = 3", 1))
    with running_server(create_app(home, manager=_manager())) as base:
        with ThreadPoolExecutor(2) as pool:
            # A request of 5 words at 1 s each keeps version 1 draining for about 5 s.
            slow = pool.submit(complete, base)
            wait_until(lambda: status(base)["replicas"][0]["outstanding"] == 1)
            swapping = pool.submit(put, base, {**echo(uppercase=True), "replicas": 1})
            wait_until(lambda: status(base)["version"] == 2)
            assert not slow.done()  # version 1 is still draining: 1 live + 1 retiring
            code, body = put(base, {**echo(), "replicas": 1}, name="other")
            assert code == 201, body  # 3 of 3, not 4: the new version counted once
            assert slow.result(timeout=30)[0] == 200
            assert swapping.result(timeout=30)[0] == 200
        code, body = put(base, {**echo(), "replicas": 1}, name="third")
        assert code == 201, body  # version 1 has stopped: 2 of 3


def test_a_deployment_named_like_one_being_deleted_answers_503_retry(tmp_path):
    """Review finding: a create while the old deployment of that name drained answered 409
    ("already exists; delete it first"), though its delete was under way."""
    home = _home(tmp_path, {"echo": {**echo(word_delay=1.0), "replicas": 1}})
    with running_server(create_app(home, manager=_manager())) as base:
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(complete, base)  # 5 words at 1 s each
            wait_until(lambda: status(base)["replicas"][0]["outstanding"] == 1)
            deleting = pool.submit(call, base, "DELETE", "/store/deployments/echo")
            wait_until(lambda: call(base, "GET", "/store/deployments/echo")[0] == 503)
            spec = {"name": "echo", **echo(), "replicas": 1}
            code, body = call(base, "POST", "/store/deployments", spec)
            assert code == 503, body
            assert "being deleted; retry shortly" in body["error"]["message"]
            assert deleting.result(timeout=30)[0] == 204
            assert slow.result(timeout=30)[0] == 200
        assert call(base, "POST", "/store/deployments", spec)[0] == 201
