"""The HTTP layer against hostile and careless clients, on a real uvicorn server with the echo
backend (no model: what is under test is what happens before and after a runner). No input may
get a 5xx; every refusal is a 4xx in OpenAI's error shape that names what was wrong."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse

import pytest
import tomli_w

import gptstore.testing.echo
from gptstore import hookimpl
from gptstore.errors import InvalidInput
from gptstore.records import ServingBackend
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.testing.echo import EchoBackend, EchoOptions, EchoRunner, echo_artifact

ADMIN, USER = "sk-admin-test", "sk-user-test"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
COMPLETION = {"model": "echo", "prompt": "one two three"}


class HeldRunner(EchoRunner):
    """An echo runner whose generate waits for ``gate`` and records the prompts it decodes."""

    gate = threading.Event()
    started = threading.Event()
    decoded: list[str] = []  # noqa: RUF012 (shared by the class on purpose: one per test module)

    def generate(self, requests):
        HeldRunner.started.set()
        HeldRunner.gate.wait(20)
        HeldRunner.decoded.extend(r.prompt for r in requests)
        return super().generate(requests)

    def stream(self, request):
        HeldRunner.decoded.append(f"stream:{request.prompt}")
        yield from super().stream(request)


class LyingRunner(EchoRunner):
    """Declares log-probabilities and returns none: a plugin that breaks the contract."""

    def info(self):
        return super().info().__class__(context_length=2048, logprobs=True)


class ExtraBackends:
    @hookimpl
    def gptstore_serving_backends(self):
        class Held(EchoBackend):
            def load(self, artifact):
                return HeldRunner(self.options)

        class Lying(EchoBackend):
            def load(self, artifact):
                return LyingRunner(self.options)

        yield ServingBackend(name="held", factory=Held, options_type=EchoOptions)
        yield ServingBackend(name="lying", factory=Lying, options_type=EchoOptions)


def _home(tmp_path, deployments):
    home = tmp_path / "home"
    echo_artifact(home / "artifacts")
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}, {"key": USER}]},
                "deployments": deployments,
            }
        )
    )
    return home


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gptstore.manager import make_plugin_manager

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    manager.register_plugin(ExtraBackends(), "extra")
    home = _home(
        tmp_path_factory.mktemp("server"),
        {
            "echo": {"artifact": "echo", "backend": "echo", "options": {"context_length": 50}},
            # Backends registered as objects of this module: served in the server's process.
            "held": {"artifact": "echo", "backend": "held", "max_batch": 1, "isolation": "none"},
            "lying": {"artifact": "echo", "backend": "lying", "isolation": "none"},
        },
    )
    with running_server(create_app(home, manager=manager)) as base:
        yield base


def call(base, method, path, body=None, *, raw=None, key=USER, headers=None):
    """(status, headers, parsed JSON body or text) of one request."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(
        method,
        path,
        body=data,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {}),
        },
    )
    answer = connection.getresponse()
    text = answer.read().decode()
    connection.close()
    try:
        parsed = json.loads(text) if text else None
    except json.JSONDecodeError:
        parsed = text
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, parsed


def refused(base, path, body, *, raw=None):
    """The 400's message, checking its OpenAI shape."""
    status, _headers, answer = call(base, "POST", path, body, raw=raw)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"
    return answer["error"]["message"]


def test_deeply_nested_json_is_a_400_not_a_500(server):
    nested = b'{"model": "echo", "prompt": "x", "user": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    assert "nested deeper than 64 levels" in refused(server, "/v1/completions", None, raw=nested)
    assert "not valid JSON" in refused(server, "/v1/completions", None, raw=b"{nope")
    assert "must be a JSON object" in refused(server, "/v1/completions", None, raw=b"[1]")


@pytest.mark.parametrize(
    ("path", "extra", "message"),
    [
        (
            "/v1/completions",
            {"max_tokens": 0},
            "max_tokens must be at least 1, got 0 @ $.max_tokens",
        ),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens must be at least 1"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens must be"),
        ("/v1/completions", {"temperature": 2.5}, "temperature must lie in 0..2, got 2.5"),
        ("/v1/completions", {"top_p": 0}, "top_p must lie in (0, 1], got 0 @ $.top_p"),
        ("/v1/completions", {"logprobs": -1}, "logprobs must lie in 0..5, got -1 @ $.logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs must lie in 0..5, got 6"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        (
            "/v1/chat/completions",
            {"logprobs": True, "top_logprobs": 21},
            "top_logprobs must lie in 0..20",
        ),
        ("/v1/completions", {"n": 17}, "n must lie in 1..16, got 17 @ $.n"),
        ("/v1/completions", {"seed": 2**63}, "seed must lie in"),
        ("/v1/completions", {"max_tokens": 4.5}, "expected int, got float @ $.max_tokens"),
        ("/v1/completions", {"tools": []}, "tools"),
        ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty must lie in -2..2"),
        ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty must lie in -2..2"),
        ("/v1/completions", {"logit_bias": {"a": 1}}, "logit_bias keys are token ids"),
        ("/v1/completions", {"logit_bias": {"1": -101}}, "logit_bias values lie in -100..100"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "needs stream"),
        (
            "/v1/chat/completions",
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "include_obfuscation",
        ),
        ("/v1/chat/completions", {"service_tier": "gold"}, "service_tier"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema"}},
            "@ $.response_format.json_schema",
        ),
        ("/v1/completions", {"response_format": {"type": "xml"}}, "@ $.response_format.type"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "needs tools @ $.tool_choice"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "a b"}}]},
            "@ $.tools[0].function.name",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": None}]},
            "@ $.messages[0]",
        ),
    ],
)
def test_out_of_range_fields_are_400s_that_name_the_field(server, path, extra, message):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), **extra}
    assert message in refused(server, path, body)


def test_text_parts_need_string_text(server):
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    assert "$.messages[0].content" in refused(server, "/v1/chat/completions", parts)
    number = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    assert "$.messages[0].content" in refused(server, "/v1/chat/completions", number)
    good = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert call(server, "POST", "/v1/chat/completions", good)[0] == 200


def test_integral_floats_and_null_max_tokens_are_accepted(server):
    status, _h, answer = call(server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": 2.0})
    assert (status, answer["choices"][0]["text"]) == (200, "one two")
    status, _h, answer = call(server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": None})
    assert (status, answer["choices"][0]["text"]) == (200, "one two three")  # default 16
    chat = {**CHAT, "max_tokens": None, "max_completion_tokens": 4.0, "n": 1.0, "seed": -5}
    status, _h, answer = call(server, "POST", "/v1/chat/completions", chat)
    assert status == 200, answer
    # Without any, chat's default is 256 tokens: beyond this echo's context of 50.
    chat = {**CHAT, "max_tokens": None}
    assert "plus max_tokens 256 exceed" in refused(server, "/v1/chat/completions", chat)


def test_the_context_is_enforced_by_the_core_with_a_code(server):
    # The echo runner declares 50 tokens (words) of context.
    status, _h, answer = call(server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": 48})
    assert status == 400
    assert answer["error"]["code"] == "context_length_exceeded"
    assert (
        "3 tokens plus max_tokens 48 exceed the model's context of 50" in answer["error"]["message"]
    )
    assert call(server, "POST", "/v1/completions", {**COMPLETION, "max_tokens": 47})[0] == 200


def test_logprobs_are_refused_where_the_runner_declares_none(server):
    message = refused(server, "/v1/completions", {**COMPLETION, "logprobs": 1})
    assert "deployment 'echo' (backend echo) does not return log-probabilities" in message
    message = refused(server, "/v1/chat/completions", {**CHAT, "logprobs": True})
    assert "does not return log-probabilities" in message


def test_penalties_and_grammars_are_refused_where_the_runner_declares_none(server):
    message = refused(server, "/v1/completions", {**COMPLETION, "frequency_penalty": 0.5})
    assert "does not apply presence_penalty, frequency_penalty or logit_bias" in message
    message = refused(server, "/v1/completions", {**COMPLETION, "logit_bias": {"3": 5}})
    assert "does not apply presence_penalty" in message
    json_object = {"response_format": {"type": "json_object"}}
    message = refused(server, "/v1/chat/completions", {**CHAT, **json_object})
    assert "does not follow a grammar; leave out response_format and tools" in message
    tool = {"type": "function", "function": {"name": "f"}}
    message = refused(server, "/v1/chat/completions", {**CHAT, "tools": [tool]})
    assert "does not follow a grammar" in message
    # what changes nothing is accepted: zero penalties, an empty bias, text, no tools
    neutral = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tools": [tool],
        "tool_choice": "none",
        "user": "u-1",
        "service_tier": "auto",
    }
    status, _h, answer = call(server, "POST", "/v1/chat/completions", {**CHAT, **neutral})
    assert status == 200, answer
    assert answer["service_tier"] == "default"


def test_a_runner_that_breaks_its_contract_is_a_500_naming_the_backend(server):
    status, _h, answer = call(
        server, "POST", "/v1/completions", {**COMPLETION, "model": "lying", "logprobs": 1}
    )
    assert status == 500
    assert answer["error"]["code"] == "plugin_error"
    assert "declares log-probabilities but returned none" in answer["error"]["message"]


def test_streams_are_server_sent_events(server):
    status, headers, text = call(server, "POST", "/v1/completions", {**COMPLETION, "stream": True})
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "one two three"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/store/select",
            {"policy": "smallest", "options": {"x": 1}},
            "it takes no options, got x @ $.options",
        ),
        (
            "/store/select",
            {"requirement": {"min_params": 10**30}},
            "min_params must lie in 1..9223372036854775807",
        ),
        (
            "/store/select",
            {"requirement": {"memory_budget": 1e300}},
            "memory_budget must lie in 1..",
        ),
        (
            "/store/select",
            {"options": {"weights": {"quality": 1e308, "size": 1e308}}},
            "must lie in 0..1000",
        ),
        ("/v1/completions", {**COMPLETION, "stream": True, "logprobs": 1}, "not streamed"),
        ("/v1/chat/completions", {**CHAT, "stream": True, "logprobs": True}, "not streamed"),
        ("/v1/completions", {**COMPLETION, "stop": "x" * 257}, "at most 256 characters"),
        (
            "/store/deployments",
            {"name": "x", "artifact": "echo", "backend": "echo", "options": {"context_length": 0}},
            "context_length must be at least 1, got 0 @ $.options.context_length",
        ),
    ],
)
def test_more_careless_input_is_a_400(server, path, body, message):
    status, _h, answer = call(server, "POST", path, body, key=ADMIN)
    assert status == 400, answer
    assert message in answer["error"]["message"]


def test_an_empty_stop_string_stops_nothing_and_query_problems_name_the_parameter(server):
    status, _h, answer = call(server, "POST", "/v1/completions", {**COMPLETION, "stop": ""})
    assert (status, answer["choices"][0]["text"]) == (200, "one two three")
    status, _h, answer = call(server, "GET", "/store/models?limit=0")
    assert status == 400
    assert "@ $.limit" in answer["error"]["message"]


def test_405_says_allow_options_lists_every_method_and_head_works(server):
    status, headers, answer = call(server, "GET", "/v1/completions")
    assert status == 405
    assert set(headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    assert answer["error"]["type"] == "invalid_request_error"
    for path, methods in (
        ("/store/deployments", {"GET", "POST", "OPTIONS"}),
        ("/store/deployments/echo", {"GET", "PUT", "DELETE", "OPTIONS"}),
        ("/health", {"GET", "HEAD", "OPTIONS"}),
    ):
        status, headers, _ = call(server, "OPTIONS", path, key=None)
        assert (status, set(headers["allow"].split(", "))) == (204, methods), path
    assert call(server, "HEAD", "/health", key=None)[:1] == (200,)
    assert call(server, "HEAD", "/ready", key=None)[:1] == (200,)


def test_error_messages_do_not_reveal_the_store_folder(server):
    status, _, body = call(server, "GET", "/store/artifacts/missing")
    assert status == 404
    message = body["error"]["message"]
    assert message == "no artifact 'missing' in $GPTSTORE_HOME/artifacts"
    status, _, body = call(
        server,
        "POST",
        "/store/deployments",
        {"name": "x", "artifact": "gone", "backend": "echo"},
        key=ADMIN,
    )
    assert status == 400  # the body names it: a bad request, not a missing deployment
    assert "$GPTSTORE_HOME/artifacts" in body["error"]["message"]
    assert "/tmp" not in body["error"]["message"]


def test_a_duplicate_deployment_is_a_409(server):
    status, _h, answer = call(
        server,
        "POST",
        "/store/deployments",
        {"name": "echo", "artifact": "echo", "backend": "echo"},
        key=ADMIN,
    )
    assert (status, answer["error"]["type"]) == (409, "conflict_error")
    assert "already exists" in answer["error"]["message"]
    status, _h, answer = call(
        server,
        "POST",
        "/store/deployments",
        {"name": "other", "artifact": "echo", "backend": "echo", "max_queue": 0},
        key=ADMIN,
    )
    assert status == 400
    assert "max_queue must lie in 1..100000, got 0 @ $.max_queue" in answer["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_has_gone_is_not_decoded(server, stream):
    HeldRunner.gate.clear()
    HeldRunner.started.clear()
    HeldRunner.decoded.clear()
    first = threading.Thread(
        target=call,
        args=(server, "POST", "/v1/completions", {**COMPLETION, "model": "held", "prompt": "a"}),
    )
    first.start()
    assert HeldRunner.started.wait(10)  # the worker is busy with "a"
    # The second request waits in the queue; its client sends it and hangs up.
    url = urllib.parse.urlsplit(server)
    body = json.dumps({**COMPLETION, "model": "held", "prompt": "gone", "stream": stream}).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {USER}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.5)  # queued
    time.sleep(0.5)  # the server notices the disconnect
    HeldRunner.gate.set()
    first.join(20)
    status, _h, _answer = call(
        server, "POST", "/v1/completions", {**COMPLETION, "model": "held", "prompt": "after"}
    )
    assert status == 200
    assert HeldRunner.decoded == ["a", "after"]


def _plugins():
    from gptstore.manager import make_plugin_manager

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    return manager


@pytest.mark.parametrize(
    ("deployment", "problem"),
    [
        (
            {"artifact": "echo", "backend": "echo", "options": {"uppercase": "yes"}},
            "expected bool, got str @ $.deployments.bad.options.uppercase",
        ),
        (
            {"artifact": "echo", "backend": "echo", "options": {"typo": 1}},
            "$.deployments.bad.options",
        ),
        ({"artifact": "nope", "backend": "echo"}, "no artifact 'nope'"),
        ({"artifact": "echo", "backend": "ehco"}, "unknown serving backend 'ehco'"),
    ],
)
def test_a_bad_deployment_stops_the_app_before_it_listens(tmp_path, deployment, problem):
    home = _home(tmp_path, {"bad": deployment})
    with pytest.raises(InvalidInput) as caught:
        create_app(home, manager=_plugins())
    message = str(caught.value)
    assert problem in message
    assert str(home / "config.toml") in message  # the file


def test_a_deployment_that_fails_to_load_unloads_the_others_and_names_the_cause(tmp_path):
    from gptstore.artifacts import ArtifactStore
    from gptstore.config import Store
    from gptstore.deploy import Deployments
    from gptstore.server.app import load_deployments
    from gptstore.server.settings import server_config

    class Broken:
        @hookimpl
        def gptstore_serving_backends(self):
            class Fails(EchoBackend):
                def load(self, artifact):
                    raise InvalidInput("weights", ["the model file is truncated"])

            yield ServingBackend(name="fails", factory=Fails)

    manager = _plugins()
    manager.register_plugin(Broken(), "broken")
    home = _home(
        tmp_path,
        {
            "good": {"artifact": "echo", "backend": "echo", "isolation": "none"},
            "bad": {"artifact": "echo", "backend": "fails", "isolation": "none"},
        },
    )
    deployments = Deployments(manager, ArtifactStore(home / "artifacts"))
    with pytest.raises(InvalidInput) as caught:
        load_deployments(server_config(Store(home)), deployments)
    assert str(caught.value) == (
        f"invalid [deployments.bad] in {home / 'config.toml'}: failed to load: "
        "invalid weights: the model file is truncated"
    )
    assert deployments.list() == []  # "good" was loaded, then unloaded


BROKEN_BACKEND = """
from gptstore.plugin import InvalidInput, ServingBackend, hookimpl


class Fails:
    def __init__(self, options):
        pass

    def load(self, artifact):
        raise InvalidInput("weights", ["the model file is truncated"])


@hookimpl
def gptstore_serving_backends():
    yield ServingBackend(name="fails", factory=Fails)
"""


@pytest.mark.parametrize(
    ("deployment", "message", "status"),
    [
        (
            {"artifact": "echo", "backend": "echo", "options": {"uppercase": "yes"}},
            "expected bool, got str @ $.deployments.bad.options.uppercase",
            1,
        ),
        ({"artifact": "echo", "backend": "ehco"}, "unknown serving backend 'ehco'", 1),
        (
            {"artifact": "echo", "backend": "fails"},
            "[deployments.bad] in {config}: failed to load: invalid weights: the model file is "
            "truncated",
            3,
        ),
    ],
)
def test_gptstore_serve_stops_before_listening(tmp_path, deployment, message, status):
    """As a user runs it: a deployment that is wrong, or fails to load, stops `gptstore serve`
    with the file, the place and the cause, and it never listens."""
    import os
    import subprocess
    import sys

    from gptstore.testing import free_port

    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_backend.py").write_text(BROKEN_BACKEND)
    info = site / "gptstore_testplugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gptstore-testplugins\nVersion: 1\n"
    )
    (info / "entry_points.txt").write_text(
        "[gptstore]\necho = gptstore.testing.echo\nfails = broken_backend\n"
    )
    home = _home(tmp_path, {"bad": deployment})
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "gptstore.cli", "--home", str(home), "serve", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "400"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert message.format(config=home / "config.toml") in output
    assert "Uvicorn running" not in output
    assert "Traceback" not in output
