"""Optimization jobs over HTTP on a real server: each job runs in a process of its own (the echo
plugin's ``echo-copy`` strategy, which copies an artifact in measured time), reports progress as
server-sent events, can be cancelled without leaving a half artifact, and outlives the server as
a record."""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse

import pytest

from gptstore.artifacts import _HELD, ArtifactStore
from gptstore.server import create_app
from gptstore.testing import running_server

from .test_replicas import ADMIN, _home, _manager, call, wait_until


@pytest.fixture
def served(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        yield base, home


def copy_job(seconds=0.2, steps=4, fail=False, **extra):
    return {
        "artifact": "echo",
        "strategy": "echo-copy",
        "options": {"seconds": seconds, "steps": steps, "fail": fail},
        **extra,
    }


def start(base, body):
    code, job = call(base, "POST", "/store/jobs", body)
    assert code == 201, job
    return job


def events(base, job_id, last=None, timeout=120):
    """The server-sent events of a job's stream, to its end: [(event, id, data)]."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    connection.request("GET", f"/store/jobs/{job_id}/events", headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    seen, fields = [], {}
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if fields:
                seen.append((fields.get("event"), fields.get("id"), json.loads(fields["data"])))
            fields = {}
            continue
        name, _, value = line.partition(": ")
        fields[name] = value
    connection.close()
    return seen


def finished(base, job_id):
    wait_until(
        lambda: call(base, "GET", f"/store/jobs/{job_id}")[1]["state"] not in ("queued", "running"),
        120,
    )
    return call(base, "GET", f"/store/jobs/{job_id}")[1]


def test_a_job_runs_apart_reports_progress_and_makes_an_artifact_with_lineage(served):
    base, home = served
    job = start(base, copy_job(id="echo-copied"))
    assert job["state"] in ("queued", "running")
    assert job["by"].startswith("key sha256:")
    stream = events(base, job["id"])
    kinds = [event for event, _, _ in stream]
    assert kinds[-1] == "end"
    assert kinds.count("progress") == 5  # 4 steps, then done
    progress = [data for event, _, data in stream if event == "progress"]
    assert [p["progress"] for p in progress] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert progress[1]["message"] == "step 2/4 loss 0.500"
    assert [int(n) for _, n, _ in stream[:-1]] == [1, 2, 3, 4, 5]
    end = stream[-1][2]
    assert (end["state"], end["result"], end["progress"]) == ("succeeded", "echo-copied", 1.0)
    assert end["pid"] != 0
    code, artifact = call(base, "GET", "/store/artifacts/echo-copied")
    assert code == 200, artifact
    assert artifact["parent"] == "echo"
    assert [a["id"] for a in artifact["lineage"]] == ["echo"]
    # Resuming after the third event replays only what came after it.
    assert [n for _, n, _ in events(base, job["id"], last=3)] == ["4", "5", None]
    code, listed = call(base, "GET", "/store/jobs")
    assert [j["id"] for j in listed] == [job["id"]]
    assert (home / "jobs" / job["id"] / "job.json").is_file()


def test_a_recipe_job_runs_every_step_and_keeps_its_report(served):
    base, _home = served
    recipe = {
        "name": "twice",
        "steps": [
            {"strategy": "echo-copy", "options": {"steps": 2}},
            {"strategy": "echo-copy", "options": {"steps": 3}, "id": "echo-twice"},
        ],
    }
    job = start(base, {"artifact": "echo", "recipe": recipe})
    end = finished(base, job["id"])
    assert end["state"] == "succeeded", end
    assert end["result"] == "echo-twice"
    assert [s["status"] for s in end["report"]["steps"]] == ["made", "made"]
    assert end["report"]["passed"] is True
    lineage = call(base, "GET", "/store/artifacts/echo-twice")[1]["lineage"]
    assert [a["id"] for a in lineage][-1] == "echo"
    assert len(lineage) == 2  # the first step's artifact, then echo


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        ({"artifact": "echo", "strategy": "nope"}, 400, "nope"),
        (copy_job(steps=0), 400, "$.options.steps"),
        ({**copy_job(), "artifact": "missing"}, 404, "missing"),
        ({**copy_job(), "data": "../secrets.txt"}, 400, "no absolute path, no '..'"),
        ({**copy_job(), "data": "/etc/passwd"}, 400, "no absolute path, no '..'"),
        ({**copy_job(), "data": "absent.jsonl"}, 400, "no such file in $GPTSTORE_HOME/data"),
        ({"artifact": "echo"}, 400, "give exactly one of strategy, recipe and recipe_file"),
        ({"artifact": "echo", "recipe_file": "../config"}, 400, "$GPTSTORE_HOME/recipes"),
        ({"artifact": "echo", "recipe_file": "absent"}, 400, "no such recipe"),
        (
            {"artifact": "echo", "recipe": {"steps": [{"strategy": "echo-copy", "data": "/x"}]}},
            400,
            "no absolute path",
        ),
        ({**copy_job(), "id": "bad/id"}, 400, "bad/id"),
    ],
)
def test_a_bad_job_is_refused_before_anything_runs(served, body, code, says):
    base, home = served
    answer, error = call(base, "POST", "/store/jobs", body)
    assert answer == code, error
    assert says in error["error"]["message"]
    assert call(base, "GET", "/store/jobs")[1] == []
    assert str(home) not in error["error"]["message"]


def test_starting_and_cancelling_jobs_needs_an_admin_key(served):
    base, _home = served
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/store/jobs", json.dumps(copy_job()))
    response = connection.getresponse()
    response.read()
    assert response.status == 401
    connection.request("GET", "/store/jobs/20261204-120000-abcdef")
    response = connection.getresponse()
    response.read()
    assert response.status == 401
    assert call(base, "GET", "/store/jobs/20261204-120000-abcdef")[0] == 404
    assert call(base, "GET", "/store/jobs/..%2Fconfig")[0] in (400, 404)


def test_a_cancelled_job_stops_and_leaves_no_half_artifact(served):
    base, home = served
    before = {a["id"] for a in call(base, "GET", "/store/artifacts")[1]}
    job = start(base, copy_job(seconds=60, steps=600, id="never"))
    wait_until(lambda: call(base, "GET", f"/store/jobs/{job['id']}")[1]["events"] >= 2)
    code, cancelled = call(base, "DELETE", f"/store/jobs/{job['id']}")
    assert code == 200, cancelled
    assert (cancelled["state"], cancelled["error"]) == ("cancelled", "cancelled")
    assert {a["id"] for a in call(base, "GET", "/store/artifacts")[1]} == before
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith(".staging")]
    assert events(base, job["id"])[-1][2]["state"] == "cancelled"
    code, again = call(base, "DELETE", f"/store/jobs/{job['id']}")
    assert code == 409, again
    assert "already ended (cancelled)" in again["error"]["message"]


def test_a_failing_job_records_why_and_keeps_nothing(served):
    base, home = served
    job = start(base, copy_job(fail=True, id="broken"))
    end = finished(base, job["id"])
    assert end["state"] == "failed"
    assert "echo-copy was told to fail (writing $GPTSTORE_HOME/artifacts/" in end["error"]
    assert str(home) not in end["error"]  # the store's places, not the server's disk
    assert call(base, "GET", "/store/artifacts/broken")[0] == 404
    assert not [p for p in (home / "artifacts").iterdir() if p.name.startswith(".staging")]


def test_jobs_wait_their_turn_and_a_queued_one_cancels_at_once(tmp_path):
    home = _home(tmp_path, {})
    config = home / "config.toml"
    config.write_text(config.read_text().replace("[server]", "[server]\nmax_jobs = 1", 1))
    with running_server(create_app(home, manager=_manager())) as base:
        first = start(base, copy_job(seconds=1, steps=4))
        second = start(base, copy_job(seconds=0.1, steps=2))
        third = start(base, copy_job(seconds=0.1, steps=2))
        assert (second["state"], third["state"]) == ("queued", "queued")
        code, cancelled = call(base, "DELETE", f"/store/jobs/{third['id']}")
        assert (code, cancelled["state"]) == (200, "cancelled")
        assert finished(base, second["id"])["state"] == "succeeded"
        first_end = finished(base, first["id"])
        second_end = call(base, "GET", f"/store/jobs/{second['id']}")[1]
        assert second_end["started_at"] >= first_end["finished_at"]  # one at a time


def test_a_job_left_running_by_a_stopped_server_is_failed_at_the_next_start(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        job = start(base, copy_job(seconds=60, steps=600, id="never"))
        wait_until(lambda: call(base, "GET", f"/store/jobs/{job['id']}")[1]["events"] >= 1)
    # The server stopped: its running job was cancelled, and says why.
    record = json.loads((home / "jobs" / job["id"] / "job.json").read_text())
    assert (record["state"], record["error"]) == ("cancelled", "cancelled: the server stopped")
    # A record left "running" (the server was killed) and a staging folder left behind.
    record.update(state="running", error=None, finished_at=None)
    (home / "jobs" / job["id"] / "job.json").write_text(json.dumps(record))
    store = ArtifactStore(home / "artifacts")
    leftover = store.staging_dir()
    os.close(_HELD.pop(str(leftover)))  # its lock let go, as by a process that died
    with running_server(create_app(home, manager=_manager())) as base:
        after = call(base, "GET", f"/store/jobs/{job['id']}")[1]
        assert (after["state"], after["error"]) == ("failed", "the server stopped while it ran")
        assert not leftover.exists()
        assert call(base, "GET", "/store/artifacts/never")[0] == 404


def test_queued_jobs_start_in_the_order_they_came(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        started = [start(base, copy_job(seconds=0.1, steps=1)) for _ in range(5)]
        ends = [finished(base, job["id"]) for job in started]
    assert [e["state"] for e in ends] == ["succeeded"] * 5
    starts = [e["started_at"] for e in ends]
    assert starts == sorted(starts)  # within one second too: ids alone do not say the order


def test_the_job_list_pages_newest_first(tmp_path):
    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        started = [start(base, copy_job(seconds=0.0, steps=1)) for _ in range(5)]
        for job in started:
            finished(base, job["id"])
        newest_first = [job["id"] for job in reversed(started)]
        code, page = call(base, "GET", "/store/jobs?limit=2")
        assert code == 200, page
        assert [j["id"] for j in page] == newest_first[:2]
        code, page = call(base, "GET", f"/store/jobs?limit=2&before={newest_first[1]}")
        assert [j["id"] for j in page] == newest_first[2:4]
        code, page = call(base, "GET", f"/store/jobs?before={newest_first[4]}")
        assert (code, page) == (200, [])
        code, body = call(base, "GET", "/store/jobs?before=20260101-000000-abcdef")
        assert code == 404, body
        assert call(base, "GET", "/store/jobs?before=nonsense")[0] == 400
        assert call(base, "GET", "/store/jobs?limit=0")[0] == 400


def test_a_second_server_on_the_same_store_leaves_the_jobs_to_the_first(tmp_path):
    from gptstore.errors import Unavailable
    from gptstore.optimization.jobs import JobRequest, Jobs

    home = _home(tmp_path, {})
    with running_server(create_app(home, manager=_manager())) as base:
        job = start(base, copy_job(seconds=60, steps=600))
        queued = start(base, copy_job())
        other = Jobs(
            _manager(),
            ArtifactStore(home / "artifacts"),
            jobs_dir=home / "jobs",
            data_dir=home / "data",
            recipes_dir=home / "recipes",
        )
        with pytest.raises(Unavailable, match="another gptstore serve"):
            other.submit(JobRequest(artifact="echo", strategy="echo-copy"))
        other.close()
        assert call(base, "GET", f"/store/jobs/{job['id']}")[1]["state"] == "running"
        assert call(base, "GET", f"/store/jobs/{queued['id']}")[1]["state"] == "queued"
        assert call(base, "DELETE", f"/store/jobs/{job['id']}")[1]["state"] == "cancelled"
        assert finished(base, queued["id"])["state"] == "succeeded"


def test_a_loss_in_a_message_is_read_up_to_its_number():
    from gptstore.server.storefront import _LOSS

    assert _LOSS.search("step 3/60 loss 2.913.").group(2) == "2.913"
    assert _LOSS.search("step 1/3 lora: step 4/60 loss 1e-3 eta 2s").group(1, 2) == ("4", "1e-3")
    assert _LOSS.search("step 3/60 loss ...") is None
