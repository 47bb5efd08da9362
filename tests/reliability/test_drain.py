"""SIGTERM with K requests in flight: all K complete with 200, /ready says 503 at once, new
requests get 503, and `gptstore serve` exits 0 (its replicas with it)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import tomli_w

from gptstore.testing import server_process
from gptstore.testing.echo import echo_artifact

ADMIN = "drain-admin"
K = 8
WORDS = 30  # at 0.04 s a word: each request takes about 1.2 s


def request(base, method, path, body=None, timeout=60):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
    connection.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = connection.getresponse()
    data = response.read().decode()
    connection.close()
    return response.status, data


def test_sigterm_lets_every_request_in_flight_complete_then_exits_0(tmp_path, fake_dist):
    site = fake_dist("gptstore-echo", {"echo": "gptstore.testing.echo"}, {})
    home = tmp_path / "home"
    echo_artifact(home / "artifacts")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                "deployments": {
                    "echo": {
                        "artifact": "echo",
                        "backend": "echo",
                        "replicas": 2,
                        "max_batch": 1,
                        "options": {"word_delay": 0.04},
                    }
                },
            }
        )
    )
    env = {
        "GPTSTORE_HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    prompt = " ".join(f"w{i}" for i in range(WORDS))
    with server_process(env=env, timeout=120) as (base, process):

        def one(index):
            body = {"model": "echo", "prompt": prompt, "max_tokens": WORDS}
            if index % 2:
                body["stream"] = True
            return request(base, "POST", "/v1/completions", body)

        with ThreadPoolExecutor(K) as pool:
            futures = [pool.submit(one, i) for i in range(K)]

            def in_flight():
                _, text = request(base, "GET", "/store/deployments/echo")
                return sum(r["outstanding"] for r in json.loads(text)["replicas"])

            deadline = time.monotonic() + 30
            while in_flight() < K and time.monotonic() < deadline:
                time.sleep(0.02)
            assert in_flight() == K
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            ready, _ = request(base, "GET", "/ready")
            refused, refusal = request(base, "GET", "/v1/models")
            answers = [future.result() for future in futures]
        code = process.wait(timeout=60)
    assert ready == 503
    assert refused == 503, refusal
    assert "shutting down" in refusal
    assert [status for status, _ in answers] == [200] * K
    for index, (_, text) in enumerate(answers):
        if index % 2:  # a stream: every word, then the end
            assert text.rstrip().endswith("data: [DONE]")
            words = [
                json.loads(line[6:])["choices"][0]["text"]
                for line in text.splitlines()
                if line.startswith("data: {")
            ]
            assert "".join(words) == prompt
        else:
            assert json.loads(text)["choices"][0]["text"] == prompt
    assert code == 0
