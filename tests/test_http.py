"""The HTTP service end to end: a real uvicorn server on 127.0.0.1, a real tiny model on the
torch backend, and the official openai client."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import openai
import pytest
import tomli_w

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.types import Manifest

ADMIN, USER = "sk-admin-test", "sk-user-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    store = ArtifactStore(home / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "model")
    store.commit(
        staging / "model",
        Manifest(id="tiny-1", origin="test:tiny", files=hash_files(staging / "model")),
    )
    store.discard(staging)
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {
                    "api_keys": [{"key": ADMIN, "role": "admin"}, {"key": USER, "role": "user"}],
                    "max_body_bytes": 65536,
                },
                "deployments": {"tiny": {"artifact": "tiny-1", "backend": "torch"}},
            }
        )
    )
    with running_server(create_app(home)) as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=USER, max_retries=0)


def raw(server, method, path, body=None, key=USER, data=None):
    request = urllib.request.Request(
        f"{server}{path}",
        method=method,
        data=data
        if data is not None
        else (json.dumps(body).encode() if body is not None else None),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read()
            return answer.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_models_lists_the_deployment(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_are_greedy_and_counted(client):
    first = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=8, temperature=0
    )
    again = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=8, temperature=0
    )
    assert first.choices[0].text == again.choices[0].text != ""
    assert first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_completions_with_n_stop_seed_and_logprobs(client):
    answer = client.completions.create(
        model="tiny", prompt=["a", "b"], n=2, max_tokens=6, temperature=1.0, seed=3, logprobs=2
    )
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert len(answer.choices[0].logprobs.top_logprobs[0]) == 2
    full = (
        client.completions.create(model="tiny", prompt="Hello", max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    cut = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=10, temperature=0, stop=[full[2:4]]
    ).choices[0]
    assert cut.text == full[: full.find(full[2:4])]
    assert cut.finish_reason == "stop"


def test_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
    ):
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == choice.message.content
    assert reasons[-1] == choice.finish_reason
    assert all(r is None for r in reasons[:-1])


def test_keys_roles_and_errors_in_openai_shape(server, client):
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    status, body = raw(server, "GET", "/v1/models", key=None)
    assert status == 401
    assert body["error"]["message"].startswith("missing API key")
    status, body = raw(
        server,
        "POST",
        "/store/deployments",
        {"name": "x", "artifact": "tiny-1", "backend": "torch"},
    )
    assert status == 403
    assert "needs an admin key" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="no deployment 'nope'"):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="exceed the model's context of 2048"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        client.completions.create(model="tiny", prompt="")
    status, body = raw(server, "POST", "/v1/completions", data=b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    status, body = raw(
        server, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}
    )
    assert (status, body["error"]["message"]) == (
        400,
        "invalid request: expected int, got str @ $.max_tokens",
    )
    status, body = raw(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x" * 70_000})
    assert status == 413
    status, body = raw(server, "GET", "/store/artifacts/..%2F..%2Fetc", key=USER)
    assert status in (400, 404)
    assert "not an artifact id" in body["error"]["message"] or status == 404


def test_deployments_and_store_api(server):
    status, created = raw(
        server,
        "POST",
        "/store/deployments",
        {"name": "second", "artifact": "tiny-1", "backend": "torch"},
        key=ADMIN,
    )
    assert (status, created["name"], created["health"]["ok"]) == (201, "second", True)
    status, listed = raw(server, "GET", "/store/deployments")
    assert [d["name"] for d in listed] == ["second", "tiny"]
    status, _ = raw(server, "DELETE", "/store/deployments/second", key=ADMIN)
    assert status == 204
    status, _body = raw(server, "GET", "/store/deployments/second")
    assert status == 404
    status, artifact = raw(server, "GET", "/store/artifacts/tiny-1")
    assert (status, artifact["origin"], artifact["lineage"]) == (200, "test:tiny", [])
    status, plugins = raw(server, "GET", "/store/plugins")
    assert {"gptstore.local", "torch"} <= {p["name"] for p in plugins}
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})


def test_streams_survive_being_advanced_from_many_threads(client):
    # The server pulls each chunk of a stream in whichever worker thread is free.
    for _ in range(3):
        chunks = list(
            client.completions.create(
                model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
            )
        )
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def concurrently(count, call):
    """Run ``call(i)`` for i in range(count) at once; the results (or errors) in order."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(i):
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as exc:  # collected, asserted on by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, client):
    # Prompts of different lengths: batched together, they are left-padded to the longest.
    prompts = [" ".join(["word"] * (i + 1)) + f" story {i}:" for i in range(8)]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    _, before = raw(server, "GET", "/store/deployments/tiny")
    together = concurrently(
        8,
        lambda i: client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=24, temperature=0
        ),
    )
    assert len(set(alone)) > 1  # answers that differ, so a mix-up would show
    assert [r.choices[0].text for r in together] == alone
    _, after = raw(server, "GET", "/store/deployments/tiny")
    # Continuous batching counts decode steps as batches and each row's steps as rows: a row
    # takes one step per token it decodes, and rows that shared steps make fewer steps.
    rows = after["batches"]["rows"] - before["batches"]["rows"]
    steps = after["batches"]["batches"] - before["batches"]["batches"]
    assert rows >= sum(r.usage.completion_tokens for r in together)
    assert steps < rows / 2  # requests that arrived while the model was busy joined the batch
    assert after["batches"]["largest"] >= 2


def test_a_full_queue_answers_429_with_retry_after(server):
    status, created = raw(
        server,
        "POST",
        "/store/deployments",
        {
            "name": "narrow",
            "artifact": "tiny-1",
            "backend": "torch",
            "max_batch": 1,
            "max_queue": 1,
        },
        key=ADMIN,
    )
    assert (status, created["max_batch"], created["max_queue"]) == (201, 1, 1)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=USER, max_retries=0)
    try:
        results = concurrently(
            6,
            lambda i: client.completions.create(
                model="narrow", prompt="Tell me everything", max_tokens=300, temperature=0
            ),
        )
    finally:
        raw(server, "DELETE", "/store/deployments/narrow", key=ADMIN)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(answered) == 6, results
    assert refused, "one runs, one waits: the others must be refused"
    assert len(answered) >= 2
    error = refused[0]
    assert error.response.headers["retry-after"] == "1"
    assert error.body["type"] == "rate_limit_error"
    assert "'narrow' is busy" in error.body["message"]
    status, body = raw(
        server,
        "POST",
        "/store/deployments",
        {"name": "wide", "artifact": "tiny-1", "backend": "torch", "max_batch": 0},
        key=ADMIN,
    )
    assert status == 400
    assert "max_batch must lie in 1..256, got 0 @ $.max_batch" in body["error"]["message"]


def test_many_concurrent_streams_all_finish(client):
    """More streams (each with two choices) than the server has worker threads: each is decoded
    by the deployment's worker in turn, none waits on a lock inside a shared thread pool."""

    def stream(i):
        chunks = client.completions.create(
            model="tiny", prompt=f"Stream {i}", max_tokens=6, temperature=0, n=2, stream=True
        )
        return [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]

    results = concurrently(24, stream)
    assert all(isinstance(r, list) and len(r) == 2 for r in results), results


def test_api_key_header_forms(server):
    for header in (f"Bearer {USER}", f"bearer {USER}", f"BEARER   {USER}  "):
        request = urllib.request.Request(
            f"{server}/v1/models", headers={"Authorization": header}, method="GET"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
    for header in (f"Basic {USER}", USER, "Bearer", f"Bearer {USER}x"):
        request = urllib.request.Request(
            f"{server}/v1/models", headers={"Authorization": header}, method="GET"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401, header


def test_too_many_completions_in_one_request_is_refused(server):
    status, body = raw(
        server,
        "POST",
        "/v1/completions",
        {"model": "tiny", "prompt": ["a"] * 20, "n": 7, "max_tokens": 1},
    )
    assert status == 400
    assert "at most 128 completions per request (prompts x n), got 140" in body["error"]["message"]


def test_keys_that_cannot_travel_in_a_header_are_refused_at_start(tmp_path):
    from gptstore.config import Store
    from gptstore.errors import InvalidInput
    from gptstore.server.settings import server_config

    config = tmp_path / "serve.toml"
    config.write_text(tomli_w.dumps({"server": {"api_keys": [{"key": " sk-x ", "role": "user"}]}}))
    with pytest.raises(InvalidInput, match="printable ASCII without spaces"):
        server_config(Store(tmp_path / "home"), config)
    config.write_text(
        tomli_w.dumps({"deployments": {"d": {"artifact": "a", "backend": "b", "max_queue": 0}}})
    )
    with pytest.raises(InvalidInput, match=r"max_queue must lie in 1\.\.100000, got 0"):
        server_config(Store(tmp_path / "home"), config)


def test_any_seed_and_any_temperature_in_range_decode(client):
    # numpy refuses negative seeds and a tiny temperature once overflowed into NaN: both were
    # 500s. A negative seed is a seed like any other; a tiny temperature is greedy in effect.
    greedy = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    for seed in (-1, -(2**63), 2**63 - 1):
        first = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=seed
        )
        again = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=seed
        )
        assert first.choices[0].text == again.choices[0].text
    for temperature in (1e-300, 5e-324):
        cold = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=6, temperature=temperature, seed=1
        )
        assert cold.choices[0].text == greedy.choices[0].text
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        seed=-7,
        stream=True,
    )
    assert list(streamed)[-1].choices[0].finish_reason in ("stop", "length")


def test_top_logprobs_are_bounded(client):
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=20,
    )
    assert len(answer.choices[0].logprobs.content[0].top_logprobs) == 20
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs must lie in 0\.\.20"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            logprobs=True,
            top_logprobs=21,
        )
