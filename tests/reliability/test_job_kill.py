"""kill -9 of `gptstore serve` while an optimization job runs: the job's process notices that
its server is gone (its standard input ends), cancels itself and exits; the next server marks
the job failed, and no half artifact or staging folder is left."""

from __future__ import annotations

import json
import os
import signal
import time

from .test_deployments import call, serve


def job_state(base, job_id):
    code, _, text = call(base, "GET", f"/store/jobs/{job_id}")
    assert code == 200, text
    return json.loads(text)


def test_kill_9_of_the_server_during_a_job_leaves_no_half_artifact(make_home):
    home, site = make_home({})
    body = {
        "artifact": "echo",
        "strategy": "echo-copy",
        "options": {"seconds": 600, "steps": 1000},
        "id": "never",
    }
    with serve(home, site) as (base, server):
        code, _, text = call(base, "POST", "/store/jobs", body)
        assert code == 201, text
        job = json.loads(text)
        deadline = time.monotonic() + 60
        while job_state(base, job["id"])["events"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        worker = job_state(base, job["id"])["pid"]
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + 30  # the job's process saw its server go, and stopped
    while True:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the job's process outlived its server"
        time.sleep(0.1)
    with serve(home, site) as (base, _server):
        after = job_state(base, job["id"])
        assert after["state"] == "failed", after
        assert after["error"] == "the server stopped while it ran"
        assert call(base, "GET", "/store/artifacts/never")[0] == 404
    leftovers = [p.name for p in (home / "artifacts").iterdir() if p.name.startswith(".staging")]
    assert leftovers == []
