"""A live swap's perplexity gate on real tiny models served by the torch backend: a version no
worse than the live one passes; a much worse one is refused and the live one keeps serving."""

from __future__ import annotations

import json
import shutil
import urllib.request

import tomli_w

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.types import Manifest

ADMIN = "gate-admin"


def _commit(store, folder, artifact_id):
    staging = store.staging_dir()
    shutil.copytree(folder, staging / "model")
    store.commit(staging / "model", Manifest(id=artifact_id, files=hash_files(staging / "model")))
    store.discard(staging)


def _sharpened(tiny_model, folder):
    """The tiny model with its final norm scaled 30x: its logits 30x sharper, its random
    guesses confidently wrong, its perplexity far higher."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model, folder)
    [weights] = folder.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 30
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def put(base, body):
    request = urllib.request.Request(
        f"{base}/store/deployments/tiny",
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_perplexity_gate_passes_a_version_as_good_and_refuses_a_worse_one(tmp_path, tiny_model):
    from gptstore.manager import make_plugin_manager

    home = tmp_path / "home"
    store = ArtifactStore(home / "artifacts")
    _commit(store, tiny_model, "tiny")
    _commit(store, tiny_model, "tiny-again")
    _commit(store, _sharpened(tiny_model, tmp_path / "worse"), "tiny-worse")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                "deployments": {"tiny": {"artifact": "tiny", "backend": "torch"}},
            }
        )
    )
    gate = {"max_perplexity_ratio": 1.05, "texts": ["The quick brown fox jumps over the lazy dog."]}
    with running_server(create_app(home, manager=make_plugin_manager())) as base:
        code, body = put(base, {"artifact": "tiny-again", "backend": "torch", "gate": gate})
        assert code == 200, body
        assert (body["version"], body["artifact"]) == (2, "tiny-again")

        code, body = put(base, {"artifact": "tiny-worse", "backend": "torch", "gate": gate})
        assert code == 422, body
        message = body["error"]["message"]
        assert "gate failed: perplexity" in message
        assert "most allowed 1.05" in message
        assert "version 2 still serves" in message
