"""The hf source through the gptstore command, offline, over a cache-laid model."""

from __future__ import annotations

import json

import tomli_w

from gptstore.testing import run_cli


def test_sources_sync_search_show_offline(hf_cache, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        tomli_w.dumps({"sources": {"hf": {"cache_dir": str(hf_cache())}}})
    )
    env = {"GPTSTORE_HOME": str(home), "HF_HUB_OFFLINE": "1", "GPTSTORE_LOAD_PLUGINS": "hf"}

    sources = json.loads(run_cli("sources", "--json", env=env).stdout)
    hf = next(s for s in sources if s["name"] == "hf")
    assert (hf["plugin"], hf["online"]) == ("hf", False)
    assert hf["status"].startswith("offline (HF_HUB_OFFLINE is set)")

    synced = run_cli("sync", "hf", env=env)
    assert synced.returncode == 0, synced.stderr
    assert "hf: 1 added" in synced.stdout

    found = run_cli("search", "--source", "hf", "tiny", env=env)
    assert found.returncode == 0, found.stderr
    assert "hf:gptstore-test/tiny-llama" in found.stdout

    shown = run_cli("show", "hf:gptstore-test/tiny-llama", env=env)
    assert "LlamaForCausalLM" in shown.stdout
    assert "apache-2.0" in shown.stdout
    assert "a" * 40 in shown.stdout
