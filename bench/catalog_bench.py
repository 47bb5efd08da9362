"""Catalog selection benchmark: p50/p95 of filter+score+rank and of text search with numeric
filters over synthetic catalogs of 100k and 1M cards.

    python bench/catalog_bench.py                 # 100k and 1M (1M takes a few minutes to fill)
    python bench/catalog_bench.py --sizes 100000  # one size
    python bench/catalog_bench.py --markdown      # also print the table for docs/benchmarks.md

Catalog files are kept under bench/results/ and reused when they already hold the right number
of cards. Targets (issue 2): p95 <= 20 ms at 100k cards and <= 100 ms at 1M.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from gptstore.catalog import Catalog
from gptstore.manager import build, make_plugin_manager
from gptstore.records import ScoringPolicy
from gptstore.selection import select_models
from gptstore.testing.synthetic import synthetic_cards
from gptstore.types import MetricFloor, Requirement

RESULTS = Path(__file__).resolve().parent / "results"
M, B, GB = 10**6, 10**9, 10**9
TARGET_P95_MS = {100_000: 20.0, 1_000_000: 100.0}

# What users ask for: a task and a size or memory bound, usually a license or a language too.
# Each runs with all three built-in policies.
SELECTIONS = {
    "text-gen <=2B, apache/mit, >=4k ctx": Requirement(
        task="text-generation", max_params=2 * B, licenses=("apache-2.0", "mit"), min_context=4096
    ),
    "text-gen, 8GB at fp16, en": Requirement(
        task="text-generation", memory_budget=8 * GB, dtype="float16", languages=("en",)
    ),
    "text-gen, mmlu>=0.6, <=7B": Requirement(
        task="text-generation", metric_floors=(MetricFloor("mmlu", 0.6),), max_params=7 * B
    ),
    "100M-1B, fr+en": Requirement(min_params=100 * M, max_params=B, languages=("fr", "en")),
}
# Stress, reported apart: requirements that admit 40-100% of the catalog. Their cost grows with
# the number of matching cards, since every match is scored.
BROAD = {
    "text-gen only": Requirement(task="text-generation"),
    "no constraint at all": Requirement(),
}
SEARCHES = {
    "'chat' <=2B": Requirement(query="chat", max_params=2 * B),
    "'code instruct' text-gen, >=8k ctx": Requirement(
        query="code instruct", task="text-generation", min_context=8192
    ),
    "'medical' apache, 1GB at int8": Requirement(
        query="medical", licenses=("apache-2.0",), memory_budget=GB, dtype="int8"
    ),
    "'org42' (prefix of ids)": Requirement(query="org42"),
}


def fill(size: int) -> tuple[Catalog, float | None]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"catalog-{size}.db"
    if path.exists():
        catalog = Catalog(path)
        if catalog.count() == size:
            return catalog, None
        catalog.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    catalog = Catalog(path)
    started = time.perf_counter()
    with catalog.write() as conn:
        # One source in one transaction, as a sync writes it.
        cards = synthetic_cards(size, seed=size, source="synthetic")
        result = catalog.replace_source(conn, "synthetic", cards)
    assert result.added == size, result
    elapsed = time.perf_counter() - started
    catalog.connection.execute("ANALYZE")
    return catalog, elapsed


def timed(run: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Milliseconds of ``repeats`` runs after one warm-up run, and the last result."""
    result = run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, result


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50), "p95_ms": percentile(samples, 95)}


def bench_size(size: int, repeats: int) -> dict[str, Any]:
    catalog, fill_seconds = fill(size)
    manager = make_plugin_manager(entrypoints=False)
    rows: list[dict[str, Any]] = []
    groups: dict[str, list[float]] = {"select": [], "broad": [], "search": []}
    for group, requirements in (("select", SELECTIONS), ("broad", BROAD)):
        for policy in ("balanced", "smallest", "best-quality"):
            scorer = build(manager.get(ScoringPolicy, policy), {})
            for label, requirement in requirements.items():
                run = partial(
                    select_models,
                    catalog,
                    scorer,
                    requirement,
                    policy=policy,
                    limit=10,
                    explain_excluded=0,
                )
                samples, selection = timed(run, repeats)
                groups[group] += samples
                rows.append(
                    {
                        "kind": group,
                        "policy": policy,
                        "query": label,
                        "matched": selection.matched,
                        **summary(samples),
                    }
                )
    explained, _ = timed(
        partial(
            select_models,
            catalog,
            build(manager.get(ScoringPolicy, "balanced"), {}),
            next(iter(SELECTIONS.values())),
            policy="balanced",
            limit=10,
            explain_excluded=20,
        ),
        repeats,
    )
    for label, requirement in SEARCHES.items():
        samples, (_entries, matched) = timed(
            partial(catalog.search, requirement, limit=20), repeats
        )
        groups["search"] += samples
        rows.append(
            {
                "kind": "search",
                "policy": "-",
                "query": label,
                "matched": matched,
                **summary(samples),
            }
        )
    catalog.close()
    return {
        "size": size,
        "fill_seconds": fill_seconds,
        "db_bytes": (RESULTS / f"catalog-{size}.db").stat().st_size,
        "groups": {name: summary(samples) for name, samples in groups.items()},
        "select_explained_p95_ms": percentile(explained, 95),
        "target_p95_ms": TARGET_P95_MS.get(size),
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| cards | select p50 | select p95 | target p95 | select p95, 20 exclusions explained "
        "| search p50 | search p95 | broad select p50 | broad select p95 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        g = r["groups"]
        lines.append(
            f"| {r['size']:,} | {g['select']['p50_ms']:.1f} ms | {g['select']['p95_ms']:.1f} ms "
            f"| {r['target_p95_ms'] or '-'} ms | {r['select_explained_p95_ms']:.1f} ms "
            f"| {g['search']['p50_ms']:.1f} ms | {g['search']['p95_ms']:.1f} ms "
            f"| {g['broad']['p50_ms']:.1f} ms | {g['broad']['p95_ms']:.1f} ms |"
        )
    for r in results:
        lines += [
            "",
            f"Per query at {r['size']:,} cards:",
            "",
            "| kind | policy | query | matched | p50 | p95 |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['kind']} | {row['policy']} | {row['query']} | {row['matched']:,} | "
            f"{row['p50_ms']:.1f} ms | {row['p95_ms']:.1f} ms |"
            for row in r["rows"]
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    results = []
    for size in args.sizes:
        result = bench_size(size, args.repeats)
        results.append(result)
        filled = f"filled in {result['fill_seconds']:.0f} s" if result["fill_seconds"] else "reused"
        g = result["groups"]
        print(
            f"{size:>9,} cards ({filled}, {result['db_bytes'] / 1e6:.0f} MB): select p95 "
            f"{g['select']['p95_ms']:.1f} ms (target {result['target_p95_ms']} ms), search p95 "
            f"{g['search']['p95_ms']:.1f} ms, broad select p95 {g['broad']['p95_ms']:.1f} ms",
            flush=True,
        )
    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "sqlite": sqlite3.sqlite_version,
    }
    (RESULTS / "catalog_bench.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
