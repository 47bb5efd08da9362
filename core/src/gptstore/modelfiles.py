"""Read what a Hugging Face format model folder says about itself, without loading weights.

- parameter count and dtype: the JSON headers of ``*.safetensors`` files (8 bytes of length, then
  JSON); the tensors themselves are never read;
- architecture and context length: ``config.json``;
- license, tags, tasks, languages, base model and reported metrics: the YAML front matter of
  ``README.md`` (the Hugging Face model-card format, including ``model-index``).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from gptstore.errors import InvalidInput, RefusedModel
from gptstore.types import Metric

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "n_ctx",
    "max_sequence_length",
)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8",
    "F8_E5M2": "float8",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise InvalidInput(str(path), ["too short to be a safetensors file"])
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise InvalidInput(str(path), [f"safetensors header of {length} bytes is too large"])
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(str(path), [f"safetensors header is not JSON: {exc}"]) from None
    if not isinstance(header, dict):
        raise InvalidInput(str(path), ["safetensors header is not a JSON object"])
    return header


_SHARD_NAME = re.compile(r"^[\w.-]+\.safetensors$")


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, following model.safetensors.index.json when sharded.

    Shard names come from a file we did not write: each must be a plain ``*.safetensors`` name
    in this folder, so an index cannot point the store at ``../../anything``.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise InvalidInput(str(index), [f"not a safetensors index: {exc!r}"]) from None
        bad = [n for n in names if not isinstance(n, str) or not _SHARD_NAME.match(n)]
        if bad:
            raise InvalidInput(
                str(index),
                [f"shard name {bad[0]!r} is not a *.safetensors file name in this folder"],
            )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InvalidInput(str(index), [f"shard {missing[0]} listed but missing"])
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def count_parameters(files: list[Path]) -> tuple[int, str | None]:
    """(parameter count, dominant dtype by bytes) from safetensors headers only."""
    total = 0
    by_dtype: Counter[str] = Counter()
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shape = entry.get("shape") if isinstance(entry, dict) else None
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (
                not isinstance(shape, list)
                or not all(isinstance(d, int) for d in shape)
                or not isinstance(offsets, list)
                or len(offsets) != 2
            ):
                raise InvalidInput(str(path), [f"tensor {name!r} has no valid shape and offsets"])
            total += math.prod(shape)
            dtype = str(entry.get("dtype", "?"))
            by_dtype[SAFETENSORS_DTYPES.get(dtype, dtype.lower())] += offsets[1] - offsets[0]
    return total, (by_dtype.most_common(1)[0][0] if by_dtype else None)


def check_weights(folder: Path) -> list[Path]:
    """The folder's safetensors files; RefusedModel when it offers only pickle weights."""
    files = weight_files(folder)
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise RefusedModel(
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); gptstore loads "
            "safetensors only, because unpickling can run arbitrary code. Convert the weights "
            "with transformers' save_pretrained(safe_serialization=True) where you trust them."
        )
    raise RefusedModel(f"{folder}: no *.safetensors weights found")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(
            str(folder), ["no config.json; not a Hugging Face model folder"]
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(str(path), [f"not valid JSON: {exc}"]) from None
    if not isinstance(config, dict):
        raise InvalidInput(str(path), ["not a JSON object"])
    return config


def context_length(config: dict[str, Any]) -> int | None:
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def architecture_tasks(architecture: str | None) -> tuple[str, ...]:
    if not architecture:
        return ()
    return tuple(task for suffix, task in _ARCHITECTURE_TASKS if architecture.endswith(suffix))[:1]


_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)(.*)\Z", re.DOTALL)


def read_readme(folder: Path) -> tuple[dict[str, Any], str]:
    """(YAML front matter, description) of README.md; ({}, "") when there is none."""
    path = folder / "README.md"
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8", errors="replace")
    match = _FRONT_MATTER.match(text)
    meta: dict[str, Any] = {}
    body = text
    if match:
        try:
            loaded = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            raise InvalidInput(str(path), [f"front matter is not valid YAML: {exc}"]) from None
        meta = loaded if isinstance(loaded, dict) else {}
        body = match.group(2)
    return meta, first_paragraph(body)


def readme_text(meta: dict[str, Any], description: str) -> str:
    """A README.md in the Hugging Face model-card format: YAML front matter, then prose."""
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n# Model\n\n{description}\n"


def first_paragraph(markdown: str, limit: int = 500) -> str:
    for block in re.split(r"\n\s*\n", markdown):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        text = " ".join(ln for ln in lines if ln and not ln.startswith(("#", "<", "|", "!", "```")))
        if text:
            return text[:limit]
    return ""


def _slug(value: Any) -> str:
    return str(value).strip().lower().rsplit("/", 1)[-1]


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list (front matter is user-written: anything else is skipped)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def parse_model_index(model_index: Any) -> tuple[Metric, ...]:
    """Metrics of a ``model-index`` block, named by dataset (``mmlu``, ``mmlu/acc_norm``).

    Entries that are not shaped like the Hugging Face format are skipped, not fatal.
    """
    metrics: dict[str, Metric] = {}
    results = [r for entry in _dicts(model_index) for r in _dicts(entry.get("results"))]
    for result in results:
        found = result.get("dataset")
        dataset: dict[str, Any] = found if isinstance(found, dict) else {}
        dataset_name = dataset.get("name") or dataset.get("type") or "unknown"
        for metric in _dicts(result.get("metrics")):
            value = metric.get("value")
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            kind = metric.get("type") or metric.get("name")
            name = _slug(dataset.get("type") or dataset_name)
            if name in metrics:
                name = f"{name}/{_slug(kind)}"
            if name not in metrics:
                metrics[name] = Metric(
                    name=name,
                    value=float(value),
                    kind=kind and str(kind),
                    dataset=str(dataset_name),
                    origin="reported",
                )
    return tuple(metrics.values())


def as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | int | float):
        return (str(value),)
    return tuple(str(v) for v in value if v is not None)


def folder_times(files: list[Path]) -> tuple[datetime | None, datetime | None]:
    stamps = [p.stat().st_mtime for p in files if p.exists()]
    if not stamps:
        return None, None
    return (datetime.fromtimestamp(min(stamps), UTC), datetime.fromtimestamp(max(stamps), UTC))
