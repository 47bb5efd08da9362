"""Many LoRA adapters on one base model: one torch deployment lists each adapter as its own
OpenAI model, loads it on first use, keeps at most max_adapters loaded (least recently used out),
and decodes rows of different adapters in one batch (peft's mixed adapter batches); every
adapter answers exactly as a deployment of that adapter alone does."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tomli_w

from gptstore.artifacts import ArtifactStore
from gptstore.server import create_app
from gptstore.testing import add_artifact, running_server
from gptstore.testing.load import call
from gptstore.testing.load import status as deployment_status
from gptstore.testing.models import build_lora_adapter
from gptstore.types import GenerationRequest

ADMIN = "sk-adapters-admin"
ADAPTERS = ("lora-a", "lora-b", "lora-c")


def add_adapter(home, base_folder, name, seed, *, dora=False):
    folder = build_lora_adapter(home / "made" / name, base_folder, seed=seed, use_dora=dora)
    add_artifact(home / "artifacts", folder, name, kind="adapter", parent="base")


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    add_artifact(home / "artifacts", tiny_model, "base")
    for seed, name in enumerate(ADAPTERS, start=1):
        add_adapter(home, tiny_model, name, seed)
    add_adapter(home, tiny_model, "dora-x", 9, dora=True)
    solo = {f"solo-{a}": {"artifact": a, "backend": "torch"} for a in ADAPTERS}
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": ADMIN, "role": "admin"}]},
                "deployments": {
                    "tiny": {
                        "artifact": "base",
                        "backend": "torch",
                        "adapters": list(ADAPTERS),
                        "max_adapters": 2,
                        "max_batch": 16,
                    },
                    "plain": {"artifact": "base", "backend": "torch"},
                    **solo,
                },
            }
        )
    )
    return home


@pytest.fixture(scope="module")
def server(home):
    with running_server(create_app(home)) as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=ADMIN, max_retries=0)


def complete(client, model, prompt="The cat"):
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    assert answer.model == model
    return answer.choices[0].text


def test_each_adapter_is_a_model_answering_as_it_does_alone(client):
    listed = {m.id: m for m in client.models.list().data}
    assert {"tiny", *ADAPTERS} <= set(listed)
    assert [listed[a].parent for a in ADAPTERS] == ["tiny"] * 3
    assert listed["tiny"].parent is None
    answers = {a: complete(client, a) for a in ADAPTERS}
    for adapter, text in answers.items():
        assert text == complete(client, f"solo-{adapter}"), adapter
    assert complete(client, "tiny") == complete(client, "plain")
    assert len({*answers.values(), complete(client, "tiny")}) == 4  # each changes the model
    chat = client.chat.completions.create(
        model="lora-b", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    alone = client.chat.completions.create(
        model="solo-lora-b",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
    )
    assert chat.choices[0].message.content == alone.choices[0].message.content


def test_rows_of_different_adapters_share_a_batch(server, client):
    expected = {m: complete(client, m, "Once upon") for m in (*ADAPTERS, "tiny")}
    jobs = [m for m in (*ADAPTERS, "tiny") for _ in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda m: (m, complete(client, m, "Once upon")), jobs))
    for model, text in answers:
        assert text == expected[model], model
    status = deployment_status(server, "tiny", key=ADMIN)
    assert status["adapters"] == list(ADAPTERS)
    assert status["batches"]["largest"] > 1


def test_least_recently_used_adapters_are_unloaded_past_the_budget(home):
    from gptstore.manager import make_plugin_manager
    from gptstore.serving.deployments import load_runner, plan

    store = ArtifactStore(home / "artifacts")
    checked = plan(make_plugin_manager(), store, "base", "torch", {}, adapters=ADAPTERS)
    runner = load_runner(checked)
    try:
        runner.set_adapters({n: a.path for n, a in checked.adapters.items()}, budget=2)

        def ask(*adapters):
            requests = [GenerationRequest(prompt="a b", max_tokens=2, adapter=a) for a in adapters]
            return [g.text for g in runner.generate(requests)]

        ask("lora-a")
        ask("lora-b")
        assert runner.loaded_adapters() == ["lora-a", "lora-b"]
        ask("lora-c")
        assert runner.loaded_adapters() == ["lora-b", "lora-c"]
        ask("lora-b")
        ask("lora-a")
        assert runner.loaded_adapters() == ["lora-b", "lora-a"]
        # one batch needing all three loads all three; the next call trims back to the budget
        mixed = ask("lora-a", "lora-b", "lora-c", None)
        assert len(runner.loaded_adapters()) == 3
        assert mixed == [ask(a)[0] for a in ("lora-a", "lora-b", "lora-c", None)]
        assert len(runner.loaded_adapters()) == 2
        with pytest.raises(Exception, match="not one of this deployment's adapters"):
            ask("nope")
    finally:
        runner.close()


def test_adapters_that_cannot_be_served_are_refused_with_the_reason(server, client):
    cases = [
        ("base", ["dora-x"], 400, "'dora-x' is a DoRA adapter"),
        ("base", ["dora-x"], 400, "@ $.adapters[0]"),
        ("lora-a", ["lora-b"], 400, "made from base, not from this deployment's artifact lora-a"),
        ("base", ["lora-a"], 409, "'lora-a' is served by deployment 'tiny'"),
        ("base", ["lora-a", "lora-a"], 400, "adapters lists 'lora-a' twice"),
        ("base", ["nothing"], 400, "no artifact 'nothing' in the store @ $.adapters[0]"),
    ]
    for artifact, adapters, code, message in cases:
        body = {"name": "new", "artifact": artifact, "backend": "torch", "adapters": adapters}
        status, _headers, text = call(server, "POST", "/store/deployments", body, key=ADMIN)
        assert status == code, (adapters, text)
        assert message in json.loads(text)["error"]["message"], (adapters, text)
    swap = {"artifact": "base", "backend": "torch", "adapters": ["lora-a"]}
    status, _headers, text = call(server, "PUT", "/store/deployments/plain", swap, key=ADMIN)
    assert status == 409, text
    assert "'lora-a' is served by deployment 'tiny'" in text
    with pytest.raises(openai.NotFoundError):
        complete(client, "lora-z")
