"""Human-friendly counts and sizes: ``200M`` parameters, ``1.5GB`` of memory."""

from __future__ import annotations

import re

from gptstore.errors import InvalidInput

_COUNT_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_BYTE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)

#: Bytes per weight for the dtypes a memory budget can be computed at.
DTYPE_BYTES: dict[str, float] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
    "uint8": 1,
    "int4": 0.5,
}
DTYPE_ALIASES = {
    "f64": "float64",
    "fp64": "float64",
    "double": "float64",
    "f32": "float32",
    "fp32": "float32",
    "float": "float32",
    "f16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "f8_e4m3": "float8",
    "f8_e5m2": "float8",
    "fp8": "float8",
    "f8": "float8",
    "i8": "int8",
    "u8": "uint8",
    "q8": "int8",
    "q4": "int4",
}


def _parse(text: str | int, suffixes: dict[str, int], what: str, example: str) -> int:
    if isinstance(text, int):
        if text < 0:
            raise InvalidInput(what, [f"{text} is negative"])
        return text
    match = _NUMBER.match(str(text))
    suffix = match.group(2).lower() if match else ""
    if not match or suffix not in suffixes:
        raise InvalidInput(
            what, [f"cannot read {text!r}; write a number with an optional suffix, e.g. {example}"]
        )
    return round(float(match.group(1)) * suffixes[suffix])


def parse_count(text: str | int, what: str = "count") -> int:
    """``"135M"`` -> 135_000_000; ``"1.5B"`` -> 1_500_000_000; plain integers pass through."""
    return _parse(text, _COUNT_SUFFIXES, what, "200M, 1.5B or 7000000")


def parse_bytes(text: str | int, what: str = "size") -> int:
    """``"2GB"`` -> 2_000_000_000; ``"1GiB"`` -> 1_073_741_824."""
    return _parse(text, _BYTE_SUFFIXES, what, "512MB, 2GB or 1.5GiB")


def format_count(value: int | None) -> str:
    """134_515_008 -> ``"134.5M"``."""
    if value is None:
        return "?"
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return str(value)


def format_bytes(value: int | float | None) -> str:
    """540_000_000 -> ``"540.0 MB"`` (decimal units, as disks and hubs count)."""
    if value is None:
        return "?"
    for suffix, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if value >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{int(value)} B"


def normalize_dtype(name: str) -> str:
    """Canonical dtype name (``"bf16"`` -> ``"bfloat16"``, ``"BF16"`` -> ``"bfloat16"``)."""
    key = name.strip().lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise InvalidInput(
            "dtype", [f"unknown dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}"]
        )
    return key
