"""``GET /metrics``: exact counts, sums and buckets after known requests; the gauges read from a
deployment snapshot at scrape time; separate registries; the route, open and outside the schema."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.datastructures import State
from litestar.testing import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gptstore.deploy.metrics import (
    E2E_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    DeploymentSnapshot,
    Metrics,
    time_per_output_token,
)
from gptstore.server.auth import require_role
from gptstore.server.metrics_api import ROUTES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DOCS = Path(__file__).resolve().parents[2] / "docs" / "http.md"


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """docs/http.md's table of metrics: exposed name -> (type, labels)."""
    section = DOCS.read_text().split("\n## Metrics\n", 1)[1]
    rows = re.findall(r"^\| `(gptstore:\w+)` \| (\w+) \| ([^|]+) \|", section, re.MULTILINE)
    return {n: (t, frozenset(x.strip() for x in labels.split(","))) for n, t, labels in rows}


def exposed(text: bytes) -> dict[str, tuple[str, frozenset[str]]]:
    """The same from an exposition: counters by their ``_total`` name, ``_created`` left out."""
    found = {}
    for f in text_string_to_metric_families(text.decode()):
        if not f.name.endswith("_created"):
            name = f.name + "_total" if f.type == "counter" else f.name
            labels = frozenset(k for s in f.samples for k in s.labels if k != "le")
            found[name] = (f.type, labels)
    return found


def busy() -> Metrics:
    """Metrics with a sample in every series."""
    m = Metrics(lambda: [DeploymentSnapshot("smol", 1, {"ready": 1}, waiting=0, running=2)])
    m.request("smol", 1, 200, prompt_tokens=2, generation_tokens=3, e2e=0.5, ttft=0.1)
    m.swap("smol", "promoted")
    return m


def scrape(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample: (name, labels) -> value."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str):
    return samples.get((name, frozenset(labels.items())))


def test_requests_tokens_and_latencies_are_exact():
    m = Metrics()
    m.request("smol", 1, 200, prompt_tokens=5, generation_tokens=11, e2e=1.2, ttft=0.2)
    m.request("smol", 1, 200, prompt_tokens=3, generation_tokens=4, e2e=0.04)  # not streamed
    m.request("smol", 1, 429)
    m.request("smol", 2, 499, prompt_tokens=7)
    s = scrape(m.render()[0])

    assert value(s, "gptstore:requests_total", deployment="smol", version="1", status="200") == 2
    assert value(s, "gptstore:requests_total", deployment="smol", version="1", status="429") == 1
    assert value(s, "gptstore:requests_total", deployment="smol", version="2", status="499") == 1
    assert value(s, "gptstore:prompt_tokens_total", deployment="smol", version="1") == 8
    assert value(s, "gptstore:generation_tokens_total", deployment="smol", version="1") == 15
    assert value(s, "gptstore:prompt_tokens_total", deployment="smol", version="2") == 7
    assert value(s, "gptstore:generation_tokens_total", deployment="smol", version="2") == 0

    v1 = {"deployment": "smol", "version": "1"}
    e2e = "gptstore:e2e_request_latency_seconds"
    assert value(s, f"{e2e}_count", **v1) == 2
    assert value(s, f"{e2e}_sum", **v1) == pytest.approx(1.24)
    assert value(s, f"{e2e}_bucket", le="0.01", **v1) == 0
    assert value(s, f"{e2e}_bucket", le="0.05", **v1) == 1
    assert value(s, f"{e2e}_bucket", le="1.0", **v1) == 1
    assert value(s, f"{e2e}_bucket", le="1.5", **v1) == 2
    assert value(s, f"{e2e}_bucket", le="+Inf", **v1) == 2

    ttft = "gptstore:time_to_first_token_seconds"
    assert value(s, f"{ttft}_count", **v1) == 1  # only the streamed one had a first token
    assert value(s, f"{ttft}_sum", **v1) == pytest.approx(0.2)
    assert value(s, f"{ttft}_bucket", le="0.1", **v1) == 0
    assert value(s, f"{ttft}_bucket", le="0.25", **v1) == 1

    # (1.2 - 0.2) / 10 = 0.1 for the streamed one, 0.04 / 4 = 0.01 for the other
    tpot = "gptstore:time_per_output_token_seconds"
    assert value(s, f"{tpot}_count", **v1) == 2
    assert value(s, f"{tpot}_sum", **v1) == pytest.approx(0.11)
    assert value(s, f"{tpot}_bucket", le="0.005", **v1) == 0
    assert value(s, f"{tpot}_bucket", le="0.01", **v1) == 1
    assert value(s, f"{tpot}_bucket", le="0.1", **v1) == 2

    # the 429 and the 499 gave no times: version 2 has no latency series with observations
    assert not value(s, f"{e2e}_count", deployment="smol", version="2")


@pytest.mark.parametrize(
    ("e2e", "ttft", "tokens", "expected"),
    [
        (1.2, 0.2, 11, 0.1),  # vLLM's: the decode time over the tokens after the first
        (1.0, None, 4, 0.25),  # not streamed: the whole request over its tokens
        (0.3, 0.3, 1, 0.3),  # one token: no decode step, the whole request
        (1.0, 0.5, 0, None),  # nothing generated
        (None, 0.5, 3, None),  # no end to end time
        (0.1, 0.2, 3, 0.0),  # clocks disagreeing by a hair never make it negative
    ],
)
def test_time_per_output_token(e2e, ttft, tokens, expected):
    assert time_per_output_token(e2e, ttft, tokens) == (
        None if expected is None else pytest.approx(expected)
    )


def test_buckets_hold_vllms_and_are_sorted():
    vllm_ttft = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
    vllm_tpot = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 80.0)
    vllm_e2e = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 60.0, 7680.0)
    for ours, theirs in (
        (TTFT_BUCKETS, vllm_ttft),
        (TPOT_BUCKETS, vllm_tpot),
        (E2E_BUCKETS, vllm_e2e),
    ):
        assert set(theirs) <= set(ours)
        assert list(ours) == sorted(set(ours))


def test_swaps_by_outcome():
    m = Metrics()
    m.swap("smol", "promoted")
    m.swap("smol", "promoted")
    m.swap("smol", "rolled_back")
    s = scrape(m.render()[0])
    assert value(s, "gptstore:swaps_total", deployment="smol", outcome="promoted") == 2
    assert value(s, "gptstore:swaps_total", deployment="smol", outcome="rolled_back") == 1
    with pytest.raises(ValueError, match="lowercase word"):
        m.swap("smol", "failed: the probe timed out")  # a series per message: refused


def test_snapshot_gauges_are_read_at_each_scrape():
    live = [
        DeploymentSnapshot("smol", 3, {"ready": 2, "dead": 1}, waiting=4, running=8),
        DeploymentSnapshot("smol", 4, {"starting": 1}, waiting=0, running=1),  # a canary
    ]
    m = Metrics(lambda: live)
    s = scrape(m.render()[0])
    v3 = {"deployment": "smol", "version": "3"}
    assert value(s, "gptstore:num_requests_waiting", **v3) == 4
    assert value(s, "gptstore:num_requests_running", **v3) == 8
    assert value(s, "gptstore:num_requests_running", deployment="smol", version="4") == 1
    assert value(s, "gptstore:replicas", state="ready", **v3) == 2
    assert value(s, "gptstore:replicas", state="dead", **v3) == 1
    # every state is listed, zero when no replica is in it
    assert value(s, "gptstore:replicas", state="draining", **v3) == 0
    assert value(s, "gptstore:replicas", state="stopped", **v3) == 0
    assert value(s, "gptstore:replicas", state="starting", deployment="smol", version="4") == 1

    live[:] = [DeploymentSnapshot("smol", 4, {"ready": 2}, waiting=1, running=2)]
    s = scrape(m.render()[0])
    assert value(s, "gptstore:num_requests_waiting", **v3) is None  # version 3 has gone
    assert value(s, "gptstore:num_requests_waiting", deployment="smol", version="4") == 1
    assert value(s, "gptstore:replicas", state="ready", deployment="smol", version="4") == 2


def test_snapshots_of_one_version_add_up():
    twice = [DeploymentSnapshot("a", 1, {"ready": 1}, waiting=2, running=3)] * 2
    s = scrape(Metrics(lambda: twice).render()[0])
    assert value(s, "gptstore:num_requests_waiting", deployment="a", version="1") == 4
    assert value(s, "gptstore:num_requests_running", deployment="a", version="1") == 6
    assert value(s, "gptstore:replicas", deployment="a", version="1", state="ready") == 2


def test_a_failing_snapshot_leaves_the_counters(caplog):
    def broken():
        raise RuntimeError("boom")

    m = Metrics(broken)
    m.request("a", 1, 200)
    with caplog.at_level(logging.ERROR, logger="gptstore.server"):
        body, _ = m.render()
    s = scrape(body)
    assert value(s, "gptstore:requests_total", deployment="a", version="1", status="200") == 1
    assert not any(name == "gptstore:num_requests_waiting" for name, _ in s)
    assert "reading the deployments failed" in caplog.text


def test_the_metrics_are_those_docs_http_md_lists():
    docs = documented()
    assert len(docs) == 10
    assert exposed(busy().render()[0]) == docs


def test_every_family_is_there_before_any_traffic():
    body, content_type = Metrics().render()
    assert content_type == CONTENT_TYPE
    assert set(exposed(body)) == set(documented())


def test_two_instances_share_nothing():
    a, b = Metrics(), Metrics()
    a.request("x", 1, 200, generation_tokens=3)
    assert (
        value(
            scrape(a.render()[0]),
            "gptstore:requests_total",
            deployment="x",
            version="1",
            status="200",
        )
        == 1
    )
    assert (
        value(
            scrape(b.render()[0]),
            "gptstore:requests_total",
            deployment="x",
            version="1",
            status="200",
        )
        is None
    )
    assert not any(n.startswith("gptstore:") for n in REGISTRY._names_to_collectors)


def _client(**state):
    # require_role as the real app has it: /metrics must answer without a key (and without the
    # settings the guard would read to check one)
    app = Litestar(route_handlers=ROUTES, guards=[require_role], state=State(state))
    return TestClient(app)


def test_route_serves_the_exposition_without_a_key():
    with _client(metrics=busy()) as client:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPE
        assert exposed(response.content) == documented()
        s = scrape(response.text)
        assert value(s, "gptstore:generation_tokens_total", deployment="smol", version="1") == 3
        assert value(s, "gptstore:num_requests_running", deployment="smol", version="1") == 2
        assert "/metrics" not in client.get("/schema/openapi.json").json()["paths"]


def test_route_is_404_when_the_app_keeps_no_metrics():
    with _client() as client:
        assert client.get("/metrics").status_code == 404
