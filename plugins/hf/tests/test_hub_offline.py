"""The ``hf`` source offline, over a real HF cache layout, through the real huggingface_hub."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from gptstore.errors import NotFound, RefusedModel
from gptstore.protocols import Refusal
from gptstore.types import ModelCard, SearchQuery
from gptstore_hf.hub import HubOptions, HubSource


def source(cache, **options):
    return HubSource(HubOptions(cache_dir=str(cache), **options))


def test_lists_the_cache_when_offline(hf_cache, offline):
    hub = source(hf_cache())
    [card] = list(hub.search(SearchQuery()))
    assert card.uid == "hf:gptstore-test/tiny-llama"
    assert card.revision == "a" * 40
    assert (card.architecture, card.license, card.tasks) == (
        "LlamaForCausalLM",
        "apache-2.0",
        ("text-generation",),
    )
    assert card.parameters > 0
    assert card.context_length == 2048
    assert card.base_model == "gptstore-test/base"
    status = hub.status()
    assert not status.online
    assert "offline (HF_HUB_OFFLINE is set)" in status.message


def test_search_filters_the_cache(hf_cache, offline):
    hub = source(hf_cache())
    assert [c.model_id for c in hub.search(SearchQuery(text="tiny chat"))] == [
        "gptstore-test/tiny-llama"
    ]
    assert list(hub.search(SearchQuery(text="vision"))) == []
    assert list(hub.search(SearchQuery(task="fill-mask"))) == []


def test_fetch_from_the_cache_pinned_to_the_revision(hf_cache, offline, tmp_path):
    hub = source(hf_cache())
    folder = hub.fetch("gptstore-test/tiny-llama", "a" * 40, tmp_path / "dest")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    assert not any(p.is_symlink() for p in folder.iterdir())
    with pytest.raises(NotFound, match="is not in the HF cache"):
        hub.fetch("gptstore-test/tiny-llama", "b" * 40, tmp_path / "dest2")
    with pytest.raises(Exception, match="is not a hub repository id"):
        hub.fetch("../../etc", None, tmp_path / "dest3")


def test_transformers_loads_the_cached_repo_by_id(hf_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = hf_cache()
    model = AutoModelForCausalLM.from_pretrained(
        "gptstore-test/tiny-llama", cache_dir=cache, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        "gptstore-test/tiny-llama", cache_dir=cache, local_files_only=True
    )
    ids = tokenizer("hello", return_tensors="pt")
    assert (
        model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1]
        == ids["input_ids"].shape[1] + 3
    )


def test_pickle_only_and_unknown_architectures_are_refused(
    hf_cache, lay, offline, tmp_path, pickle_only_files
):
    cache = hf_cache()
    lay(cache, "old/pickled", pickle_only_files, "c" * 40)
    weights = (
        cache / "models--gptstore-test--tiny-llama" / "snapshots" / ("a" * 40) / "model.safetensors"
    )
    lay(
        cache,
        "new/exotic",
        {
            "config.json": json.dumps(
                {
                    "model_type": "exotic-net",
                    "architectures": ["ExoticForCausalLM"],
                    "auto_map": {"AutoModelForCausalLM": "modeling_exotic.Exotic"},
                }
            ).encode(),
            "model.safetensors": weights,
        },
        "d" * 40,
    )
    hub = source(cache)
    items = {i.model_id: i for i in hub.search(SearchQuery())}
    assert isinstance(items["old/pickled"], Refusal)
    assert "only pickle weights (pytorch_model.bin)" in items["old/pickled"].reason
    with pytest.raises(RefusedModel, match="only pickle weights"):
        hub.fetch("old/pickled", None, tmp_path / "a")
    with pytest.raises(
        RefusedModel,
        match="architecture 'exotic-net' is unknown to the installed "
        "transformers and asks for remote code",
    ):
        hub.fetch("new/exotic", None, tmp_path / "b")


def test_an_unreachable_hub_fails_fast_and_falls_back_to_the_cache(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # A server on loopback that accepts connections and never answers: the worst case.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        hub = source(
            hf_cache(), endpoint=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1.0
        )
        started = time.monotonic()
        cards = list(hub.search(SearchQuery()))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        server.close()
    assert elapsed < 3
    assert [c.model_id for c in cards if isinstance(c, ModelCard)] == ["gptstore-test/tiny-llama"]
    assert "no answer from http://127.0.0.1" in hub.status().message


def test_an_unresolvable_hub_is_offline_in_seconds(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = source(hf_cache(), endpoint="https://hub.gptstore.invalid")
    started = time.monotonic()
    status = hub.status()
    assert time.monotonic() - started < 6
    assert not status.online
    assert "unreachable" in status.message or "no answer" in status.message


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (
            401,
            "repository acme/secret: access denied (HTTP 401); if it is gated or private, accept "
            "its terms on the hub, then set HF_TOKEN or run `huggingface-cli login`",
        ),
        (403, "access denied (HTTP 403)"),
        (404, "repository acme/secret not found on https://huggingface.co"),
        (500, "the hub answered HTTP 500"),
    ],
)
def test_hub_errors_say_which_repo_and_what_to_do(status, message):
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    response = requests.Response()
    response.status_code = status
    response.url = "https://huggingface.co/api/models/acme/secret"
    error = HfHubHTTPError(f"{status} Client Error", response=response)
    hub = HubSource(HubOptions(endpoint="https://huggingface.co"))
    assert message in str(hub._hub_error(error, "acme/secret"))
