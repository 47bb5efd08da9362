"""The server's Prometheus metrics, named as vLLM names its own with a ``gptstore:`` prefix (so
``vllm:time_to_first_token_seconds`` is ``gptstore:time_to_first_token_seconds``): times in
seconds, counters ending in ``_total``, every series labelled by ``deployment`` and ``version``.

Two kinds of metric. What happened is counted as it happens (:meth:`Metrics.request`,
:meth:`Metrics.swap`): requests by status, tokens, and latency histograms. What *is* (queue
depth, running batch size, replica states) is read from the deployments at scrape time through
a ``snapshot`` callable, so the gauges can never drift from the router's own counts.

Label values are series: a label must come from a small set (a served deployment's name, never
a client's unchecked ``model`` string; a status code; a swap outcome word).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, get_args

from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric

from gptstore.deploy.replicas import ReplicaState

log = logging.getLogger("gptstore.server")

PREFIX = "gptstore:"

# vLLM's buckets (its v1 engine), so dashboards and SLOs written for vLLM line up; a few are
# added below its smallest, where small models on a GPU (a token in a few ms) and short answers
# would otherwise all fall in the first bucket. The top ones hold a CPU's long prompts.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005,  # not vLLM's
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1,  # not vLLM's
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

#: What :meth:`Metrics.swap` accepts as an outcome: a word, never a message (``"failed: why"``
#: would make a new series for every reason).
OUTCOME = re.compile(r"[a-z][a-z_]*")

#: Every replica state at zero: the gauges list them all (see :class:`_Snapshots`).
ALL_STATES = dict.fromkeys(get_args(ReplicaState), 0)


@frozen
class DeploymentSnapshot:
    """One deployment version as a scrape sees it. A deployment with a canary gives two, one per
    version; two with the same name and version are added up."""

    name: str
    version: int
    replica_states: dict[str, int]  # state -> how many replicas are in it
    waiting: int  # calls queued, not yet in a batch
    running: int  # calls in a batch now


def time_per_output_token(e2e: float | None, ttft: float | None, tokens: int) -> float | None:
    """Seconds per generated token after the first, vLLM's definition: ``(e2e - ttft) /
    (tokens - 1)``. Without a first-token time (a non-streamed answer) or with one token, the
    whole request over its tokens, ``e2e / tokens``: that includes the prefill, so it reads high
    for short answers, but it is the only time such a request has. ``None``: nothing to observe."""
    if e2e is None or tokens <= 0:
        return None
    if ttft is not None and tokens > 1:
        return max(e2e - ttft, 0.0) / (tokens - 1)
    return e2e / tokens


class Metrics:
    """The server's metrics, in a registry of its own (not prometheus_client's global one, so two
    apps in one process do not clash). Thread-safe: prometheus_client's metrics lock."""

    def __init__(self, snapshot: Callable[[], Iterable[DeploymentSnapshot]] | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["deployment", "version"]

        def counter(name: str, help: str, names: list[str]) -> Counter:
            # prometheus_client adds "_total" to a counter's name itself
            return Counter(PREFIX + name, help, names, registry=self.registry)

        def histogram(name: str, help: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, help, labels, registry=self.registry, buckets=buckets)

        self._requests = counter(
            "requests",
            "Requests finished, by HTTP status (499: the client left).",
            [*labels, "status"],
        )
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.", labels)
        self._generation_tokens = counter("generation_tokens", "Tokens generated.", labels)
        self._swaps = counter("swaps", "Version swaps, by outcome.", ["deployment", "outcome"])
        self._ttft = histogram(
            "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self._tpot = histogram(
            "time_per_output_token_seconds",
            "Time per output token after the first, in seconds.",
            TPOT_BUCKETS,
        )
        self._e2e = histogram(
            "e2e_request_latency_seconds", "End to end request latency in seconds.", E2E_BUCKETS
        )
        self.registry.register(_Snapshots(snapshot or (lambda: ())))

    def request(
        self,
        deployment: str,
        version: int,
        status: int,
        *,
        prompt_tokens: int = 0,
        generation_tokens: int = 0,
        e2e: float | None = None,
        ttft: float | None = None,
    ) -> None:
        """One finished request: counted by status, its tokens added, its times observed when
        given (give them for answered requests: a 429 answered in a millisecond is no latency);
        time per output token as :func:`time_per_output_token` says."""
        labels = (deployment, str(version))
        self._requests.labels(*labels, str(status)).inc()
        self._prompt_tokens.labels(*labels).inc(prompt_tokens)
        self._generation_tokens.labels(*labels).inc(generation_tokens)
        if e2e is not None:
            self._e2e.labels(*labels).observe(e2e)
        if ttft is not None:
            self._ttft.labels(*labels).observe(ttft)
        tpot = time_per_output_token(e2e, ttft, generation_tokens)
        if tpot is not None:
            self._tpot.labels(*labels).observe(tpot)

    def swap(self, deployment: str, outcome: str) -> None:
        """One swap's outcome: ``"promoted"``, ``"rolled_back"``, ``"failed"``, ``"canary"``...
        (a lowercase word, see :data:`OUTCOME`; anything else is a ValueError)."""
        if not OUTCOME.fullmatch(outcome):
            raise ValueError(f"a swap outcome is a lowercase word, not {outcome!r}")
        self._swaps.labels(deployment, outcome).inc()

    def summary(self, deployment: str) -> dict[str, Any]:
        """What a person looking at ``deployment`` wants from these metrics, over all its
        versions: requests by status and by version, tokens, and the median and 99th percentile
        of end-to-end latency and time to first token (estimated from the histograms' buckets
        as Prometheus's ``histogram_quantile`` does), with the latency histogram itself."""
        requests: collections.Counter[str] = collections.Counter()
        versions: collections.Counter[str] = collections.Counter()
        tokens = 0.0
        for sample in _samples(self._requests, deployment, "_total"):
            requests[sample.labels["status"]] += int(sample.value)
            versions[sample.labels["version"]] += int(sample.value)
        for sample in _samples(self._generation_tokens, deployment, "_total"):
            tokens += sample.value
        return {
            "requests": dict(sorted(requests.items())),
            "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
            "generation_tokens": int(tokens),
            "e2e": _quantiles(self._e2e, deployment),
            "ttft": _quantiles(self._ttft, deployment),
        }

    def render(self) -> tuple[bytes, str]:
        """The exposition (body, content type): Prometheus's classic text format, which
        ``generate_latest`` writes and prometheus_client's own handlers serve as
        ``text/plain; version=0.0.4`` (its ``CONTENT_TYPE_LATEST`` says 1.0.0, the format with
        UTF-8 names, which these names do not need)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _samples(metric: Counter | Histogram, deployment: str, suffix: str = "") -> list[Any]:
    """The metric's samples of ``deployment`` whose names end with ``suffix`` (a counter's
    ``_total``, not its ``_created`` timestamp)."""
    return [
        sample
        for family in metric.collect()
        for sample in family.samples
        if sample.labels.get("deployment") == deployment and sample.name.endswith(suffix)
    ]


def _quantiles(histogram: Histogram, deployment: str) -> dict[str, Any]:
    """p50 and p99 (None without observations), count, and the buckets as (bound, count in
    it), summed over the deployment's versions."""
    cumulative: collections.Counter[float] = collections.Counter()
    total = 0.0
    for sample in _samples(histogram, deployment):
        if sample.name.endswith("_bucket"):
            cumulative[float(sample.labels["le"])] += sample.value
        elif sample.name.endswith("_count"):
            total += sample.value
    bounds = sorted(cumulative)

    def quantile(q: float) -> float | None:
        if not total:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            if cumulative[bound] >= rank:
                if bound == float("inf"):
                    return lower  # past the last finite bound: that bound, as Prometheus does
                share = (rank - below) / max(cumulative[bound] - below, 1e-12)
                return lower + (bound - lower) * share
            lower, below = bound, cumulative[bound]
        return lower

    buckets, below = [], 0.0
    for bound in bounds:
        buckets.append((bound, int(cumulative[bound] - below)))
        below = cumulative[bound]
    return {"p50": quantile(0.5), "p99": quantile(0.99), "count": int(total), "buckets": buckets}


class _Snapshots:
    """Gauges read from the deployments at each scrape. Every replica state appears, zero when no
    replica is in it, so an alert on ``state="dead"`` sees 0 rather than no series."""

    def __init__(self, snapshot: Callable[[], Iterable[DeploymentSnapshot]]) -> None:
        self._snapshot = snapshot

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["deployment", "version"]
        return (
            GaugeMetricFamily(
                PREFIX + "num_requests_waiting",
                "Requests queued, not yet in a batch.",
                labels=labels,
            ),
            GaugeMetricFamily(
                PREFIX + "num_requests_running", "Requests in a running batch.", labels=labels
            ),
            GaugeMetricFamily(PREFIX + "replicas", "Replicas by state.", labels=[*labels, "state"]),
        )

    def describe(self) -> Iterable[Metric]:
        """The names, so the registry refuses a clash without calling the snapshot."""
        return self._families()

    def collect(self) -> Iterable[Metric]:
        waiting, running, replicas = families = self._families()
        try:
            snapshots = list(self._snapshot())
        except Exception:  # a scrape still gets the counters
            log.exception("metrics: reading the deployments failed")
            return families
        queued: collections.Counter[tuple[str, str]] = collections.Counter()
        batched: collections.Counter[tuple[str, str]] = collections.Counter()
        states: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for s in snapshots:
            key = (s.name, str(s.version))
            queued[key] += s.waiting
            batched[key] += s.running
            for state, count in (ALL_STATES | s.replica_states).items():
                states[(*key, state)] += count
        for key, count in queued.items():
            waiting.add_metric(list(key), count)
        for key, count in batched.items():
            running.add_metric(list(key), count)
        for key3, count in states.items():
            replicas.add_metric(list(key3), count)
        return families


def status_of(exc: BaseException) -> int:
    """The HTTP status a failed call is answered with (as ``gptstore.server.errors`` maps it),
    for the requests counter; 499 when the client left."""
    from gptstore.errors import (
        Conflict,
        InvalidInput,
        NotFound,
        PluginError,
        SwapFailed,
        Unavailable,
        UnknownName,
    )
    from gptstore.serving.batching import Overloaded

    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return 499
    for kind, status in (
        (Overloaded, 429),
        (Unavailable, 503),
        (NotFound | UnknownName, 404),
        (Conflict, 409),
        (SwapFailed, 422),
        (InvalidInput, 400),
    ):
        if isinstance(exc, kind):
            return status
    if isinstance(exc, PluginError):
        return 500
    return 400 if type(exc).__module__ == "gptstore.errors" else 500
