"""Many LoRA adapters on one base against one merged model, on SmolLM2-135M-Instruct (torch
backend, one replica, max_batch 8, 2 threads), over HTTP:

- **8 adapters**: 8 clients, each on its own adapter of one deployment (``adapters``, rows of
  different adapters in one batch through peft's mixed adapter batches);
- **1 adapter**: 8 clients on the same adapter of that deployment;
- **merged**: 8 clients on one deployment of an adapter merged into the weights (what serving an
  adapter costs without run-time LoRA).

Each client sends its requests one after another (a 16-token prompt, 64 greedy tokens, the end of
sequence banned so every answer has 64); the figure is completion tokens per second over all
clients. Rounds alternate between the three, and the table gives medians.

    tox -e bench-adapters     (or: python bench/adapters_bench.py [--rounds 3])
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomli_w

HERE = Path(__file__).parent
KEY = "sk-bench-adapters"
ADAPTERS = [f"smollm2-lora-{i}" for i in range(8)]
CLIENTS, REQUESTS, NEW_TOKENS = 8, 4, 64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_artifacts(home: Path) -> Any:
    """SmolLM2, 8 LoRA adapters of it (r 8 on every projection; random weights: speed does not
    depend on what they learned) and the first one merged (made once; those made before with
    other weights are kept)."""
    from peft import PeftModel
    from serving_bench import import_smollm2  # type: ignore[import-not-found]
    from transformers import AutoModelForCausalLM

    from gptstore.artifacts import hash_files
    from gptstore.testing import add_artifact
    from gptstore.testing.models import build_lora_adapter
    from gptstore.types import Manifest

    store = import_smollm2(home)
    base = store.get("smollm2")
    for seed, name in enumerate(ADAPTERS):
        if store.find(name) is None:
            folder = build_lora_adapter(
                home / "made" / name, base.path, seed=seed, r=8, target_modules=PROJECTIONS
            )
            add_artifact(store.root, folder, name, kind="adapter", parent="smollm2")
    if store.find("smollm2-lora-merged") is None:
        model = AutoModelForCausalLM.from_pretrained(base.path)
        merged = PeftModel.from_pretrained(model, store.get(ADAPTERS[0]).path).merge_and_unload()
        staging = store.staging_dir()
        merged.save_pretrained(staging / "m", safe_serialization=True)
        for extra in base.path.iterdir():
            if extra.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (staging / "m" / extra.name).write_bytes(extra.read_bytes())
        store.commit(
            staging / "m",
            Manifest(id="smollm2-lora-merged", parent=ADAPTERS[0], files=hash_files(staging / "m")),
        )
        store.discard(staging)
    return store


def load(base_url: str, models: list[str], eos: list[int]) -> float:
    """Completion tokens per second of CLIENTS clients, client i on models[i]."""
    from gptstore.testing.load import call

    def client(model: str) -> int:
        made = 0
        for _ in range(REQUESTS):
            status, _h, text = call(
                base_url,
                "POST",
                "/v1/completions",
                {
                    "model": model,
                    "prompt": "Write about the sea, the wind and the old lighthouse keeper",
                    "max_tokens": NEW_TOKENS,
                    "temperature": 0,
                    "logit_bias": {str(t): -100 for t in eos},
                },
                key=KEY,
            )
            assert status == 200, text
            made += json.loads(text)["usage"]["completion_tokens"]
        return made

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        made = sum(pool.map(client, models))
    return made / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=HERE / "results" / "adapters-home")
    args = parser.parse_args()
    from gptstore.server import create_app
    from gptstore.testing import running_server

    store = make_artifacts(args.home)
    eos = json.loads((store.get("smollm2").path / "generation_config.json").read_text())
    eos_ids = (
        eos["eos_token_id"] if isinstance(eos["eos_token_id"], list) else [eos["eos_token_id"]]
    )
    common = {"backend": "torch", "max_batch": 8, "options": {"threads": 2}}
    (args.home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": KEY, "role": "admin"}]},
                "deployments": {
                    "multi": {"artifact": "smollm2", "adapters": ADAPTERS, **common},
                    "merged": {"artifact": "smollm2-lora-merged", **common},
                },
            }
        )
    )
    setups = {
        "8 clients, 8 adapters": ADAPTERS,
        "8 clients, 1 adapter": [ADAPTERS[0]] * CLIENTS,
        "8 clients, merged": ["merged"] * CLIENTS,
    }
    figures: dict[str, list[float]] = {name: [] for name in setups}
    with running_server(create_app(args.home)) as base_url:
        load(base_url, ADAPTERS, eos_ids)  # warm up: every adapter loaded once
        load(base_url, ["merged"] * CLIENTS, eos_ids)
        for round_ in range(args.rounds):
            order = list(setups) if round_ % 2 == 0 else list(setups)[::-1]
            for name in order:
                figures[name].append(load(base_url, setups[name], eos_ids))
                print(f"round {round_ + 1}: {name}: {figures[name][-1]:.1f} tok/s", flush=True)
    merged = statistics.median(figures["8 clients, merged"])
    print("\n| setup | completion tok/s | against merged |")
    print("|---|---|---|")
    for name, values in figures.items():
        value = statistics.median(values)
        print(f"| {name} | {value:.1f} | {value / merged:.2f}x |")


if __name__ == "__main__":
    main()
