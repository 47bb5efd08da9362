"""Example model folders for the quickstart: real HF-format models with random weights, of
different sizes, licenses, languages, tasks and reported metrics, plus one folder the store must
refuse (pickle weights only).

    python -m gptstore.testing.examples ~/gptstore-demo/models
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gptstore.testing.models import build_causal_lm, readme_text

DAY = 86400.0


def _model_index(name: str, results: dict[str, tuple[str, float]]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": dataset.upper(), "type": dataset},
                    "metrics": [{"type": kind, "value": value}],
                }
                for dataset, (kind, value) in results.items()
            ],
        }
    ]


# name -> (build options, README front matter, days since last update)
EXAMPLES: dict[str, tuple[dict[str, Any], dict[str, Any], float]] = {
    "pico-chat": (
        {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
        {
            "license": "apache-2.0",
            "language": ["en"],
            "pipeline_tag": "text-generation",
            "tags": ["chat", "tiny"],
            "model-index": _model_index("pico-chat", {"mmlu": ("acc", 25.2)}),
        },
        20,
    ),
    "nano-coder": (
        {"hidden_size": 256, "num_layers": 4, "max_position_embeddings": 4096},
        {
            "license": "mit",
            "language": ["en"],
            "pipeline_tag": "text-generation",
            "tags": ["code", "python"],
            "model-index": _model_index(
                "nano-coder", {"humaneval": ("pass@1", 0.12), "mmlu": ("acc", 0.27)}
            ),
        },
        90,
    ),
    "micro-bilingual": (
        {
            "hidden_size": 512,
            "num_layers": 6,
            "num_heads": 8,
            "num_kv_heads": 4,
            "max_position_embeddings": 8192,
        },
        {
            "license": "apache-2.0",
            "language": ["en", "fr"],
            "pipeline_tag": "text-generation",
            "tags": ["chat", "multilingual"],
            "base_model": "example/micro-base",
            "model-index": _model_index(
                "micro-bilingual", {"mmlu": ("acc", 31.0), "hellaswag": ("acc_norm", 41.5)}
            ),
        },
        200,
    ),
    "small-base": (
        {
            "hidden_size": 768,
            "num_layers": 12,
            "num_heads": 12,
            "num_kv_heads": 4,
            "dtype": "bfloat16",
        },
        {
            "license": "llama3.2",
            "language": ["en", "de"],
            "pipeline_tag": "text-generation",
            "tags": ["base"],
            "model-index": _model_index("small-base", {"mmlu": ("acc", 35.5)}),
        },
        400,
    ),
    "medium-instruct": (
        {
            "hidden_size": 1024,
            "num_layers": 16,
            "num_heads": 16,
            "num_kv_heads": 4,
            "max_position_embeddings": 8192,
            "dtype": "bfloat16",
        },
        {
            "license": "apache-2.0",
            "language": ["en"],
            "pipeline_tag": "text-generation",
            "tags": ["chat", "instruct"],
            "model-index": _model_index("medium-instruct", {"mmlu": ("acc", 44.8)}),
        },
        60,
    ),
}


def _age(folder: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for path in folder.iterdir():
        os.utime(path, (stamp, stamp))


def build_examples(dest: Path) -> list[Path]:
    """Build every example under ``dest`` (skipping folders already there); return the folders."""
    dest.mkdir(parents=True, exist_ok=True)
    built = []
    for name, (options, meta, days) in EXAMPLES.items():
        folder = dest / name
        if not (folder / "config.json").is_file():
            build_causal_lm(
                folder,
                readme=meta,
                seed=len(built),
                description=f"{name}: an example model with random weights.",
                **options,
            )
            _age(folder, days)
        built.append(folder)
    pickled = dest / "legacy-pickle"
    pickled.mkdir(exist_ok=True)
    (pickled / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    # Never loaded: gptstore refuses pickle weights by their name alone.
    (pickled / "pytorch_model.bin").write_bytes(b"pickle weights are refused, never read")
    (pickled / "README.md").write_text(readme_text({"license": "mit"}, "An old pickle model."))
    built.append(pickled)
    return built


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m gptstore.testing.examples DEST")
    for folder in build_examples(Path(args[0]).expanduser()):
        print(folder)


if __name__ == "__main__":
    main()
