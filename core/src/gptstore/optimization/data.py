"""Datasets for optimization and evaluation: read from files, digested, split deterministically.

A file is plain text (one example per non-empty line) or JSONL (``.jsonl``): one JSON object per
line with ``text`` (a string) or ``messages`` (a chat, rendered with the model's template by the
step that uses it).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path

from gptstore.errors import InvalidInput
from gptstore.types import ChatMessage, Dataset, Example

#: The built-in corpus: text every Python install has (the documentation topics of pydoc).
DEFAULT_CORPUS = "pydoc_data.topics"


def digest(examples: Sequence[Example]) -> str | None:
    """sha256 over the examples in order (None when there are none)."""
    if not examples:
        return None
    total = hashlib.sha256()
    for example in examples:
        if isinstance(example, str):
            encoded = example.encode()
        else:
            encoded = json.dumps([[m.role, m.content] for m in example]).encode()
        total.update(hashlib.sha256(encoded).digest())
    return total.hexdigest()


def dataset(examples: Sequence[Example], origin: str) -> Dataset:
    return Dataset(tuple(examples), digest(examples), origin)


def _message(value: object, where: str) -> ChatMessage:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("role"), str)
        or not isinstance(value.get("content"), str)
    ):
        raise ValueError(f'each message needs a string "role" and "content" @ {where}')
    return ChatMessage(value["role"], value["content"])


def load_dataset(path: Path) -> Dataset:
    """The examples of a text or JSONL file; InvalidInput naming the file and line otherwise."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(str(path), [f"cannot read it: {exc}"]) from None
    if path.suffix.lower() != ".jsonl":
        return dataset([line for line in lines if line.strip()], str(path))
    examples: list[Example] = []
    problems = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                examples.append(item["text"])
            elif isinstance(item, dict) and isinstance(item.get("messages"), list):
                examples.append(
                    tuple(
                        _message(m, f"line {number}, messages[{i}]")
                        for i, m in enumerate(item["messages"])
                    )
                )
            else:
                raise ValueError('expected an object with "text" (a string) or "messages" (a list)')
        except (json.JSONDecodeError, ValueError) as exc:
            problems.append(f"line {number}: {exc}")
            if len(problems) >= 5:
                break
    if problems:
        raise InvalidInput(str(path), problems)
    return dataset(examples, str(path))


def default_texts(limit: int = 3000) -> list[str]:
    """A passage of the built-in corpus (no download), for demos and default measurements."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics["assignment"][:limit]]


def split(data: Dataset, heldout: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, held-out): a seeded shuffle, so the same data and seed always split the same
    way; each part keeps the origin and gets its own digest."""
    if not 0 < heldout < 1:
        raise InvalidInput("split", [f"the held-out fraction must lie in (0, 1), got {heldout}"])
    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    count = max(1, round(len(order) * heldout)) if order else 0
    held = sorted(order[:count])
    kept = sorted(order[count:])
    return (
        dataset([data.examples[i] for i in kept], f"{data.origin} (train, seed {seed})"),
        dataset([data.examples[i] for i in held], f"{data.origin} (held out, seed {seed})"),
    )


def default_dataset() -> Dataset:
    """The built-in corpus: one example per documentation topic, in a stable order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return dataset([topics[name].strip() for name in sorted(topics)], DEFAULT_CORPUS)


def default_heldout(max_chars: int = 20_000) -> Dataset:
    """The held-out tenth of the built-in corpus (seed 0: never the part a step trains or
    calibrates on), its first examples up to ``max_chars`` so a measurement stays quick."""
    _train, heldout = split(default_dataset(), 0.1)
    examples: list[Example] = []
    total = 0
    for example in heldout.examples:
        size = len(example) if isinstance(example, str) else sum(len(m.content) for m in example)
        if examples and total + size > max_chars:
            break
        examples.append(example)
        total += size
    return dataset(examples, heldout.origin)
