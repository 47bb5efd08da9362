"""kill -9 during `gptstore sync`: a sync is one write transaction, so a sync killed at any point
of its write leaves the catalog as it was. After each kill, SQLite's integrity check passes, the
listing `gptstore search` shows is exactly the one from before (every card, its revision, whether
it is listed, down to each card's synced_at in the database), and the next sync completes with
the listing a store that was never interrupted has.

The store home holds a couple of hundred local model folders (the built-in `local` source) and
thousands of cards from the `synthetic` source of sync_plugin.py, which the `gptstore` command
loads as an installed plugin. The plugin pauses the write at a chosen point (after N cards, or
just before COMMIT) and says so with a marker file; the test then sends SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from gptstore.modelfiles import readme_text
from gptstore.testing import run_cli

pytestmark = pytest.mark.slow  # about a minute
PLUGIN = Path(__file__).with_name("sync_plugin.py")
SHIFT = 250  # sync_plugin.SHIFT: synthetic cards added and delisted per generation
LOCAL_MODELS = 200
SYNTHETIC_CARDS = 4000
#: Every card of every source is written in each sync (unchanged ones get their synced_at).
WRITTEN = LOCAL_MODELS + SYNTHETIC_CARDS
KILL_POINTS = (
    "card:0",  # the write transaction is open, nothing written yet
    f"card:{WRITTEN // 3}",
    f"card:{2 * WRITTEN // 3}",
    f"card:{WRITTEN}",  # every card written, the delisting of the rest not yet
    "commit",  # everything written, COMMIT not yet run
)
LICENSES = ("apache-2.0", "mit", "llama3.2", "gemma")


def safetensors(path: Path, rows: int, cols: int) -> None:
    """A real safetensors file of one float32 tensor (zeros): the local source reads its
    header for the parameter count and dtype."""
    header = json.dumps(
        {"weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(rows * cols * 4))


def local_model(models: Path, index: int, generation: int = 0) -> None:
    folder = models / f"org{index % 7}" / f"local-model-{index:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512 << index % 8}
    (folder / "config.json").write_text(json.dumps(config))
    meta = {
        "license": LICENSES[index % len(LICENSES)],
        "language": ["en", "fr"][: 1 + index % 2],
        "pipeline_tag": "text-generation",
        "tags": ["local", f"family-{index % 5}"],
    }
    (folder / "README.md").write_text(
        readme_text(meta, f"Local model {index}, revision {generation}.")
    )
    safetensors(folder / "model.safetensors", 8 + index % 16, 16)


def change_local_models(models: Path, generation: int) -> None:
    """One folder more, one README changed (its card is updated), one folder removed."""
    local_model(models, LOCAL_MODELS + generation)
    local_model(models, generation * 11, generation)
    removed = models / f"org{(generation * 13) % 7}" / f"local-model-{generation * 13:04d}"
    for path in removed.iterdir():
        path.unlink()
    removed.rmdir()


def set_generation(home: Path, generation: int, models: Path) -> None:
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "sources": {
                    "local": {"paths": [str(models)]},
                    "synthetic": {"count": SYNTHETIC_CARDS, "generation": generation},
                }
            }
        )
    )


def listing(home: Path) -> str:
    """Everything `gptstore search` shows, delisted cards included."""
    result = run_cli(
        "--home", str(home), "search", "--include-delisted", "--limit", "1000000", "--json"
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def snapshot(home: Path) -> tuple[list[tuple[object, ...]], int]:
    """What a sync writes, as the database holds it: per card its uid, fingerprint, synced_at,
    delisting; and the number of recorded syncs."""
    with sqlite3.connect(home / "catalog.db") as conn:
        cards = conn.execute(
            "SELECT d.card_id, d.uid, d.fingerprint, d.synced_at, d.delisted_at, c.listed "
            "FROM card_docs d JOIN cards c ON c.id = d.card_id ORDER BY d.card_id"
        ).fetchall()
        (runs,) = conn.execute("SELECT count(*) FROM sync_runs").fetchone()
    conn.close()
    return cards, runs


def integrity(home: Path) -> list[str]:
    conn = sqlite3.connect(home / "catalog.db")
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def sync(home: Path, env: dict[str, str]) -> str:
    result = run_cli("--home", str(home), "sync", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "synthetic: " in result.stdout, result.stdout + result.stderr
    return result.stdout


def killed_sync(home: Path, env: dict[str, str], point: str, marker: Path) -> int:
    """Start `gptstore sync` paused at ``point`` of its write, SIGKILL it there; returns the size
    of the catalog's WAL at the kill."""
    marker.unlink(missing_ok=True)
    log = marker.with_suffix(".log")
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gptstore.cli", "--home", str(home), "sync"],
            env={
                **os.environ,
                **env,
                "GPTSTORE_RELIABILITY_PAUSE": point,
                "GPTSTORE_RELIABILITY_MARKER": str(marker),
            },
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert process.poll() is None, f"sync ended before {point}: {log.read_text()}"
                assert time.monotonic() < deadline, f"sync never reached {point}"
                time.sleep(0.01)
            wal = home / "catalog.db-wal"
            wal_bytes = wal.stat().st_size if wal.exists() else 0
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    return wal_bytes


def test_kill_9_during_sync_leaves_the_previous_listing(tmp_path, fake_dist):
    site = fake_dist(
        "gptstore-reliability-sync",
        {"reliability-sync": "reliability_sync_plugin"},
        {"reliability_sync_plugin": PLUGIN.read_text()},
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    models = tmp_path / "models"
    for index in range(LOCAL_MODELS):
        local_model(models, index)
    # `control` takes the same syncs, never interrupted: what a completed sync must show.
    home, control = tmp_path / "home", tmp_path / "control"
    for store in (home, control):
        store.mkdir()
        set_generation(store, 0, models)
        sync(store, env)
    assert listing(home) == listing(control)
    assert json.loads(listing(home))["total"] == WRITTEN

    for generation, point in enumerate(KILL_POINTS, start=1):
        change_local_models(models, generation)
        for store in (home, control):
            set_generation(store, generation, models)
        before, stored = listing(home), snapshot(home)

        wal_bytes = killed_sync(home, env, point, tmp_path / "paused")
        if point != "card:0":  # uncommitted pages had reached the WAL: the kill hit a write
            assert wal_bytes > 0, point

        assert integrity(home) == ["ok"], point
        assert listing(home) == before, f"the listing changed after a kill at {point}"
        assert snapshot(home) == stored, f"the catalog changed after a kill at {point}"

        report = sync(home, env)
        sync(control, env)
        after = listing(home)
        assert after != before
        assert after == listing(control), f"the sync after a kill at {point} differs"
        assert f"synthetic: {SHIFT} added, " in report, report
        assert f" unchanged, {SHIFT} delisted" in report, report
        assert integrity(home) == ["ok"]
