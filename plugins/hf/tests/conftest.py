"""A real Hugging Face cache layout, laid out locally (the hub is never reached in tests)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gptstore.testing.models import readme_text


def lay_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str) -> Path:
    """models--owner--name/{blobs,refs/main,snapshots/<commit>} as huggingface_hub writes it:
    each snapshot file is a relative symlink to a blob named after its content hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", snapshot / name)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """``hf_cache()`` -> a cache holding ``gptstore-test/tiny-llama`` (the tiny model, with a
    model card); call ``lay_repo(cache, ...)`` for more repositories."""
    cache = tmp_path / "hf-cache"

    def make() -> Path:
        files: dict[str, Path | bytes] = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
        files["README.md"] = readme_text(
            {
                "license": "apache-2.0",
                "language": ["en"],
                "pipeline_tag": "text-generation",
                "tags": ["tiny", "chat"],
                "base_model": "gptstore-test/base",
            },
            "A tiny test model laid into an HF cache.",
        ).encode()
        lay_repo(cache, "gptstore-test/tiny-llama", files, "a" * 40)
        return cache

    return make


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def lay() -> Callable[..., Path]:
    """``lay(cache, repo_id, files, commit)``: add a repository to a cache."""
    return lay_repo


@pytest.fixture
def pickle_only_files() -> dict[str, Path | bytes]:
    return {
        "config.json": json.dumps({"model_type": "gpt2"}).encode(),
        "pytorch_model.bin": b"never unpickled",
    }
