"""OpenAI field parity, structured outputs and tool calls, end to end: a real server on
127.0.0.1, a tiny model on the torch and onnx backends, the official openai client and
LangChain's ChatOpenAI (which sends many defaults: stream_options, n, penalties...).

The tiny model's weights are random, so what it writes is noise: that is the point of the
structured-output tests, whose every answer must still parse and validate (jsonschema) because
the decode loop only lets it pick tokens the schema's grammar allows.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import tomli_w
import transformers

from gptstore.artifacts import ArtifactStore
from gptstore.manager import make_plugin_manager
from gptstore.optimization.run import optimize
from gptstore.server import create_app
from gptstore.testing import add_artifact, running_server
from gptstore.testing.load import status as deployment_status

KEY = "sk-fields"
MODELS = ("tiny", "tiny-onnx")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
        "express": {"type": ["boolean", "null"]},
    },
    "required": ["id", "items", "express"],
    "additionalProperties": False,
}
CHOICE = {
    "type": "object",
    "properties": {
        "answer": {"anyOf": [{"const": "yes"}, {"const": "no"}, {"type": "integer", "maximum": 9}]}
    },
    "required": ["answer"],
    "additionalProperties": False,
}
SCHEMAS = {"person": PERSON, "order": ORDER, "choice": CHOICE}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    store = ArtifactStore.of(add_artifact(home / "artifacts", tiny_model, "tiny-1"))
    onnx = optimize(make_plugin_manager(), store, "tiny-1", "onnx-export")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": KEY, "role": "user"}]},
                "deployments": {
                    "tiny": {"artifact": "tiny-1", "backend": "torch", "max_batch": 8},
                    "tiny-onnx": {"artifact": onnx.id, "backend": "onnx", "max_batch": 8},
                },
            }
        )
    )
    with running_server(create_app(home)) as base:
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}


def streamed_text(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- structured outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_every_json_schema_answer_parses_and_validates(client, model):
    """3 schemas x 8 seeds, sampled at temperature 1, on chat (whole and streamed) and
    completions: 72 answers per backend, every one valid."""
    checked = 0
    for name, schema in SCHEMAS.items():
        for seed in range(8):
            settings = {
                "model": model,
                "max_tokens": 160,
                "temperature": 1.0,
                "seed": seed,
                "response_format": schema_format(name),
            }
            messages = [{"role": "user", "content": f"Give me a {name}"}]
            chat = client.chat.completions.create(messages=messages, **settings)
            stream = client.chat.completions.create(messages=messages, stream=True, **settings)
            completion = client.completions.create(
                prompt=f"A {name}:",
                extra_body={"response_format": settings["response_format"]},
                **{k: v for k, v in settings.items() if k != "response_format"},
            )
            assert chat.choices[0].finish_reason == "stop"
            assert completion.choices[0].finish_reason == "stop"
            for text in (
                chat.choices[0].message.content,
                streamed_text(stream),
                completion.choices[0].text,
            ):
                jsonschema.validate(json.loads(text), schema)
                checked += 1
    assert checked == 72


def test_json_object_answers_are_objects(client):
    """Any JSON object: a random model may not close a string within max_tokens, so every answer
    that finished parses as an object, and a cut-off one is a prefix of one (finish length)."""
    finished = 0
    for seed in range(8):
        answer = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "JSON please"}],
            max_tokens=48,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
        )
        text = answer.choices[0].message.content
        assert text.startswith("{")
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    greedy = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_object"},
        logit_bias={},
    )
    assert greedy.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("model", MODELS)
def test_rows_with_different_grammars_decode_in_one_batch(server, client, model):
    """Concurrent requests, each with its own schema or none, batched together: each answer
    follows its own grammar."""
    jobs = [(name, seed) for name in (*SCHEMAS, None) for seed in range(4)]

    def ask(job):
        name, seed = job
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "go"}],
            max_tokens=160 if name else 24,
            temperature=1.0,
            seed=seed,
            **({"response_format": schema_format(name)} if name else {}),
        )
        return name, answer.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for name, text in answers:
        if name is not None:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    batches = deployment_status(server, model, key=KEY)["batches"]
    assert batches["largest"] > 1, batches


def test_a_bad_schema_is_a_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "minProperties": "x"}},
            },
        )
    assert "response_format" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "yaml"},
        )
    assert "$.response_format.type" in refused.value.body["message"]


# -- tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_required_tool_calls_follow_the_parameter_schemas(client, model):
    for seed in range(8):
        answer = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function"
            assert call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_a_named_tool_is_called_once_and_streams_in_openai_shape(client):
    settings = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Time in Tokyo?"}],
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 120,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**settings)
    calls = whole.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    chunks = list(client.chat.completions.create(stream=True, **settings))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["get_time"]
    assert deltas[0].index == 0
    assert deltas[0].function.arguments == calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_one_call_when_parallel_calls_are_off_and_the_history_takes_tool_results(client):
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    calls = answer.choices[0].message.tool_calls
    assert len(calls) == 1
    follow_up = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "weather?"},
            answer.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert follow_up.choices[0].message.tool_calls is None
    assert follow_up.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "tool", "content": "x"}],
        )
    assert "tool_call_id" in refused.value.body["message"]


def test_auto_tool_choice_answers_text_or_calls(client):
    """With tool_choice auto the answer is free text (not starting with '<') or tool calls;
    streamed or not, the same."""
    for seed in range(6):
        settings = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello"}],
            "tools": [WEATHER],
            "max_tokens": 60,
            "temperature": 1.0,
            "seed": seed,
        }
        whole = client.chat.completions.create(**settings)
        message = whole.choices[0].message
        chunks = list(client.chat.completions.create(stream=True, **settings))
        if message.tool_calls:
            assert whole.choices[0].finish_reason == "tool_calls"
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            assert not message.content.startswith("<")
            assert streamed_text(chunks) == message.content


# -- OpenAI's other fields -----------------------------------------------------------------------


def test_stream_options_include_usage(client):
    for choices, stream in (
        (
            2,
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=12,
                temperature=0,
                n=2,
                stream=True,
                stream_options={"include_usage": True},
            ),
        ),
        (
            4,
            client.completions.create(
                model="tiny-onnx",
                prompt=["one", "two words"],
                max_tokens=12,
                temperature=0,
                n=2,
                stream=True,
                stream_options={"include_usage": True},
            ),
        ),
    ):
        chunks = list(stream)
        *body, last = chunks
        assert last.choices == []
        assert last.usage is not None
        assert all(c.usage is None for c in body)
        finished = sum(1 for c in body if c.choices[0].finish_reason)
        assert finished == choices
        assert 0 < last.usage.completion_tokens <= 12 * finished
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0
    )
    streamed = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            stream_options={"include_usage": True},
        )
    assert "stream_options" in refused.value.body["message"]


def tokens(client, model, prompt, **settings):
    answer = client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, logprobs=0, **settings
    )
    return answer.choices[0].logprobs.tokens


@pytest.mark.parametrize("model", MODELS)
def test_penalties_and_logit_bias(client, tiny_model, model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    plain = tokens(client, model, "the cat")
    # zero penalties and an empty bias change nothing
    assert tokens(client, model, "the cat", presence_penalty=0, frequency_penalty=0) == plain
    # +100 makes one token the only choice; -100 bans the greedy one
    forced = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" is"))[0]
    assert set(tokens(client, model, "the cat", logit_bias={str(forced): 100})) == {
        tokenizer.decode([forced])
    }
    first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(plain[0]))[0]
    banned = tokens(client, model, "the cat", logit_bias={str(first): -100})
    assert plain[0] not in banned
    # penalties push away from tokens already written: fewer repeats
    penalised = tokens(client, model, "the cat", frequency_penalty=2.0, presence_penalty=1.0)
    assert len(set(penalised)) / len(penalised) > len(set(plain)) / len(plain), (plain, penalised)
    negative = tokens(client, model, "the cat", presence_penalty=-2.0)
    assert len(set(negative)) <= len(set(plain))


def test_field_bounds_and_unknown_fields_are_400s_naming_them(client):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, named in (
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"service_tier": "premium"}, "service_tier"),
        ({"extra_body": None, "audio": {"voice": "x"}}, "audio"),
        ({"store": True}, "store"),
    ):
        body = {**base, **{k: v for k, v in extra.items() if k != "extra_body"}}
        with pytest.raises(openai.BadRequestError) as refused:
            client.post("/chat/completions", body=body, cast_to=object)
        assert named in refused.value.body["message"], (extra, refused.value.body)
    accepted = client.chat.completions.create(
        **base, user="someone", service_tier="auto", max_completion_tokens=3
    )
    assert accepted.service_tier == "default"
    assert accepted.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", echo=True)
    assert "echo" in refused.value.body["message"]


# -- a second client: LangChain ----------------------------------------------------------------


def test_langchain_chat_openai_invokes_streams_structures_and_calls_tools(server):
    from langchain_openai import ChatOpenAI

    def chat_model(**settings):
        return ChatOpenAI(
            model="tiny", base_url=f"{server}/v1", api_key=KEY, max_retries=0, **settings
        )

    chat = chat_model(temperature=0, max_tokens=16, stream_usage=True)
    answer = chat.invoke("hello")
    assert answer.content
    assert answer.usage_metadata["output_tokens"] > 0
    streamed = None
    for chunk in chat.stream("hello"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.content == answer.content
    assert streamed.usage_metadata["output_tokens"] == answer.usage_metadata["output_tokens"]
    structured = chat_model(temperature=0.7).with_structured_output(
        {"title": "person", "description": "a person", **PERSON}, method="json_schema"
    )
    person = structured.invoke("Describe a person")
    jsonschema.validate(person, PERSON)
    called = (
        chat_model(temperature=0, max_tokens=200)
        .bind_tools([WEATHER], tool_choice="get_weather")
        .invoke("Weather in Oslo?")
    )
    assert called.tool_calls
    assert called.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(called.tool_calls[0]["args"], PARAMETERS["get_weather"])
