"""Many LoRA adapters on one base model: one torch deployment lists each adapter as its own
OpenAI model, loads it on first use, keeps at most max_adapters loaded (least recently used out),
and decodes rows of different adapters in one batch (peft's mixed adapter batches); every
adapter answers exactly as a deployment of that adapter alone does."""

from __future__ import annotations

import json
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tomli_w

from gptstore.artifacts import ArtifactStore, hash_files
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.types import GenerationRequest, Manifest

ADMIN = "sk-adapters-admin"
ADAPTERS = ("lora-a", "lora-b", "lora-c")


def save_adapter(store, base_folder, name, seed, *, dora=False):
    """A LoRA adapter of ``base`` with random (not zero) weights, so that each one changes the
    model's answers in its own way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
        use_dora=dora,
    )
    staging = store.staging_dir()
    get_peft_model(model, config).save_pretrained(staging / "a", safe_serialization=True)
    store.commit(
        staging / "a",
        Manifest(id=name, kind="adapter", parent="base", files=hash_files(staging / "a")),
    )
    store.discard(staging)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    store = ArtifactStore(home / "artifacts")
    staging = store.staging_dir()
    shutil.copytree(tiny_model, staging / "m")
    store.commit(staging / "m", Manifest(id="base", files=hash_files(staging / "m")))
    store.discard(staging)
    for seed, name in enumerate(ADAPTERS, start=1):
        save_adapter(store, tiny_model, name, seed)
    save_adapter(store, tiny_model, "dora-x", 9, dora=True)
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
    request = urllib.request.Request(
        f"{server}/store/deployments/tiny", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        status = json.load(answer)
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


def post(server, path, body):
    request = urllib.request.Request(
        f"{server}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_adapters_that_cannot_be_served_are_refused_with_the_reason(server, client):
    status, body = post(
        server,
        "/store/deployments",
        {"name": "d1", "artifact": "base", "backend": "torch", "adapters": ["dora-x"]},
    )
    assert status == 400
    assert "DoRA adapter" in body["error"]["message"]
    assert "$.adapters[0]" in body["error"]["message"]
    status, body = post(
        server,
        "/store/deployments",
        {"name": "d2", "artifact": "lora-a", "backend": "torch", "adapters": ["lora-b"]},
    )
    assert status == 400
    assert "made from base, not from this deployment's artifact lora-a" in body["error"]["message"]
    status, body = post(
        server,
        "/store/deployments",
        {"name": "d3", "artifact": "base", "backend": "torch", "adapters": ["lora-a"]},
    )
    assert status == 409
    assert "'lora-a' is served by deployment 'tiny'" in body["error"]["message"]
    status, body = post(
        server,
        "/store/deployments",
        {"name": "d4", "artifact": "base", "backend": "torch", "adapters": ["lora-a", "lora-a"]},
    )
    assert status == 400
    assert "twice" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        complete(client, "lora-z")
