"""The pytest fixtures of :mod:`gptstore.testing` (see its text), kept apart so that its helpers
import without pytest."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gptstore.config import Store
from gptstore.manager import PluginManager, make_plugin_manager


@pytest.fixture
def plugin_manager() -> Iterator[PluginManager]:
    return make_plugin_manager(entrypoints=False)


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    home = tmp_path / "gptstore-home"
    monkeypatch.setenv("GPTSTORE_HOME", str(home))
    return Store(home)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("torch", "transformers", "tokenizers", "safetensors"):
        pytest.importorskip(
            module,
            reason=f"tiny_model builds a real model with {module}: pip install 'gptstore[test]'",
        )
    from gptstore.testing.models import build_causal_lm

    return build_causal_lm(
        tmp_path_factory.mktemp("tiny-model") / "tiny-llama",
        readme={
            "license": "apache-2.0",
            "language": ["en"],
            "pipeline_tag": "text-generation",
            "tags": ["tiny", "test"],
        },
    )


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """``fake_dist("gptstore-x", {"x": "x_plugin"}, {"x_plugin": source})`` -> the site folder.

    The distribution is a real ``*.dist-info`` folder with METADATA and entry_points.txt, so
    importlib.metadata finds it exactly as it finds a pip-installed plugin.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    added: list[str] = []

    def make(
        name: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "1.0"
    ) -> Path:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[gptstore]\n{lines}")
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            added.append(module)
        return root

    yield make
    for module in added:
        sys.modules.pop(module, None)
