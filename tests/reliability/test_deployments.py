"""The deployment manager under load, against `gptstore serve` run as users run it (its own
process, replicas as processes of their own, the echo backend installed as a plugin): each test
asserts exact outcomes.

- hot swap under load, 2,000 requests from 16 clients, streams included: 0 failed; every answer
  from the old or the new version;
- failed swap (crash on load; failed probe) under the same load: 0 failed; the old version live;
- overload with the queue held full: exactly the expected count of 429, each with Retry-After;
  0 5xx;
- kill -9 of one replica under load: non-streamed requests 0 failed (retried); streams cut at
  most the calls it had in flight; the replica back;
- kill -9 of the server during a swap's record write: the record is the previous one or the new
  one, whole; the server restarts on it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptstore.testing import load, server_process

ADMIN = "reliability-admin"
PROMPT = "alpha beta gamma delta"
OLD, NEW = PROMPT, PROMPT.upper()
CLIENTS = 16


def echo(replicas=2, **options):
    return {"artifact": "echo", "backend": "echo", "replicas": replicas, "options": options}


def serve(home, site):
    """`gptstore serve` with the store at ``home`` and the echo plugin on the path: (base URL,
    process)."""
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return server_process(env={"GPTSTORE_HOME": str(home), "PYTHONPATH": path}, timeout=120)


def call(base, method, path, body=None, timeout=120):
    return load.call(base, method, path, body, key=ADMIN, timeout=timeout)


def status(base, name="echo"):
    return load.status(base, name, key=ADMIN)


def completion(base, stream, prompt=PROMPT):
    return load.completion(base, stream, prompt, key=ADMIN)


def run_load(base, total, during=None):
    return load.run_load(base, total, during, key=ADMIN, prompt=PROMPT, clients=CLIENTS)


def test_a_hot_swap_under_load_fails_no_request(make_home):
    home, site = make_home({"echo": echo(word_delay=0.001)})
    with serve(home, site) as (base, _process):
        answers, (code, _, text) = run_load(
            base,
            2000,
            lambda: call(
                base, "PUT", "/store/deployments/echo", echo(uppercase=True, word_delay=0.001)
            ),
        )
        assert code == 200, text
        assert len(answers) == 2000
        assert [a for a in answers if a[1] != 200 or not a[3]] == []
        assert Counter(a[2] for a in answers).keys() == {OLD, NEW}
        assert completion(base, False)[1] == NEW
        state = status(base)
        assert state["version"] == 2
        assert [r["state"] for r in state["replicas"]] == ["ready", "ready"]


@pytest.mark.parametrize(
    ("options", "says"), [({"load": "crash"}, "status 70"), ({"load": "broken"}, "probe")]
)
def test_a_failed_swap_under_load_fails_no_request_and_keeps_the_old_version(
    make_home, options, says
):
    home, site = make_home({"echo": echo(word_delay=0.001)})
    with serve(home, site) as (base, _process):
        answers, (code, _, text) = run_load(
            base, 1000, lambda: call(base, "PUT", "/store/deployments/echo", echo(**options))
        )
        assert code == 422, text
        assert says in text
        assert [a for a in answers if a[1:] != (200, OLD, True)] == []
        state = status(base)
        assert state["version"] == 1
        assert state["versions"][-1]["outcome"].startswith("failed: ")
        assert completion(base, False)[1] == OLD


def test_overload_answers_exactly_the_expected_429s(make_home):
    # One replica decoding one request at a time, at most QUEUE waiting: a burst of BURST
    # requests while the first runs fills it, and the rest are refused. The first holds the
    # model for 3 s, far longer than the burst takes to arrive.
    queue, burst = 3, 12
    home, site = make_home(
        {"echo": {**echo(replicas=1, word_delay=0.3), "max_batch": 1, "max_queue": queue}}
    )
    with serve(home, site) as (base, _process):
        results = []
        with ThreadPoolExecutor(burst) as pool:
            body = {"model": "echo", "prompt": " ".join(["w"] * 10), "max_tokens": 10}
            futures = [
                pool.submit(call, base, "POST", "/v1/completions", body) for _ in range(burst)
            ]
            results = [f.result() for f in futures]
    codes = Counter(code for code, _, _ in results)
    assert codes == {200: queue + 1, 429: burst - queue - 1}
    for code, headers, text in results:
        if code == 429:
            assert headers["retry-after"] == "1"
            assert "'echo' is busy" in text


def test_kill_9_of_a_replica_under_load(make_home):
    home, site = make_home({"echo": echo(word_delay=0.01)})
    with serve(home, site) as (base, _process):
        victim = status(base)["replicas"][0]

        def kill():
            os.kill(victim["pid"], signal.SIGKILL)

        answers, _ = run_load(base, 600, kill)
        failed_plain = [a for a in answers if not a[0] and a[1] != 200]
        cut_streams = [a for a in answers if a[0] and not (a[1] == 200 and a[3])]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            replica = status(base)["replicas"][0]
            if replica["state"] == "ready" and replica["pid"] != victim["pid"]:
                break
            time.sleep(0.1)
        replica = status(base)["replicas"][0]
    assert failed_plain == []  # retried on the other replica
    assert len(cut_streams) <= replica["lost"]
    assert (replica["state"], replica["restarts"]) == ("ready", 1)
    assert replica["pid"] != victim["pid"]


def test_kill_9_of_the_server_during_a_swap_keeps_a_whole_record(make_home):
    home, site = make_home({})
    record = home / "deployments" / "made.json"
    for attempt in range(6):
        with serve(home, site) as (base, process):
            if attempt == 0:
                code, _, text = call(base, "PUT", "/store/deployments/made", echo(replicas=1))
                assert code == 201, text
            before = json.loads(record.read_text())
            change = echo(replicas=1, uppercase=attempt % 2 == 0)

            def swap(change=change):
                # The server is killed under it: that is the point.
                with contextlib.suppress(OSError, http.client.HTTPException):
                    call(base, "PUT", "/store/deployments/made", change, timeout=30)

            swapping = threading.Thread(target=swap, daemon=True)
            swapping.start()
            time.sleep(0.1 + 0.15 * attempt)  # a different moment of the swap each time
            process.kill()
            process.wait()
        after = json.loads(record.read_text())  # whole JSON: never half written
        assert after["version"] in (before["version"], before["version"] + 1)
        with serve(home, site) as (base, _process):
            state = status(base, "made")
            assert state["version"] == after["version"]
            code, _, text = call(
                base,
                "POST",
                "/v1/completions",
                {"model": "made", "prompt": PROMPT, "max_tokens": 8},
            )
            assert code == 200, text
