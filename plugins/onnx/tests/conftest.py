"""Shared fixtures: the tiny model exported once per session."""

from __future__ import annotations

import shutil

import pytest

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.optimization.run import optimize
from gptstore.types import Manifest
from gptstore_onnx import plugin


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model):
    from gptstore.manager import make_plugin_manager

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(plugin, "onnx")
    store = ArtifactStore(tmp_path_factory.mktemp("store") / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "m")
    base = store.commit(staging / "m", Manifest(id="tiny-1", files=hash_files(staging / "m")))
    store.discard(staging)
    progress = []
    onnx = optimize(
        manager, store, base.id, "onnx-export", progress=lambda f, m: progress.append(f)
    )
    return manager, store, base, onnx, progress
