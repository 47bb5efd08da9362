"""Regressions the OpenAPI fuzz of tests/reliability found: answers the server gave that its own
OpenAPI schema did not describe (checked here against the schema the server serves, with a small
JSON Schema checker for the keywords it uses), and requests the schema refuses that the server
accepted."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import tomli_w

import gptstore.testing.echo
from gptstore.catalog import Catalog
from gptstore.converter import json_converter, structure
from gptstore.errors import InvalidInput
from gptstore.manager import make_plugin_manager
from gptstore.server import create_app
from gptstore.testing import running_server
from gptstore.testing.echo import echo_artifact
from gptstore.testing.synthetic import synthetic_cards
from gptstore.types import MetricFloor, Requirement

KEY = "sk-fuzz-regressions"
TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
    "object": dict,
    "array": list,
}


def problems(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the keywords the server's schema uses; ``$ref`` into
    ``root``; contentSchema checked on the JSON a contentMediaType application/json string
    holds)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        return problems(value, root["components"]["schemas"][name], root, at)
    found: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        is_bool = isinstance(value, bool)
        if not any(isinstance(value, TYPES[t]) and (t == "boolean" or not is_bool) for t in types):
            return [f"{at}: {value!r:.60} is not of type {schema['type']}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{at}: {value!r:.60} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{at}: {value!r:.60} is not one of {schema['enum']}")
    for keyword in ("anyOf", "oneOf"):
        if keyword in schema:
            passing = [not problems(value, option, root, at) for option in schema[keyword]]
            if sum(passing) < 1 or (keyword == "oneOf" and sum(passing) > 1):
                found.append(f"{at}: {value!r:.60} fails {keyword}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [
            f"{at}: {key!r} is required" for key in schema.get("required", ()) if key not in value
        ]
        for key, item in value.items():
            if key in properties:
                found += problems(item, properties[key], root, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{at}: {key!r} is not allowed")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += problems(item, schema["items"], root, f"{at}[{index}]")
    if isinstance(value, str) and schema.get("contentMediaType") == "application/json":
        try:
            document = json.loads(value)
        except json.JSONDecodeError:
            return [*found, f"{at}: not JSON"]
        found += problems(document, schema.get("contentSchema", {}), root, f"{at}<json>")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-regressions") / "home"
    echo_artifact(home / "artifacts")
    Catalog(home / "catalog.db").upsert(list(synthetic_cards(50)), source="synthetic")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": KEY, "role": "admin"}]},
                "deployments": {"echo": {"artifact": "echo", "backend": "echo"}},
            }
        )
    )
    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    with running_server(create_app(home, manager=manager)) as base:
        with urllib.request.urlopen(f"{base}/schema/openapi.json") as answer:
            openapi = json.load(answer)
        yield base, openapi


def call(base: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """(status, content type, body) of ``POST path``."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def post(base: str, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
    status, content_type, raw = call(base, path, body)
    assert status == 200, raw
    return content_type, raw


def response_schema(openapi: dict[str, Any], path: str, media_type: str) -> dict[str, Any]:
    schema: dict[str, Any] = openapi["paths"][path]["post"]["responses"]["200"]["content"][
        media_type
    ]["schema"]
    return schema


def test_the_checker_finds_what_it_should():
    schema = {
        "type": "object",
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"type": "object", "required": ["id"]},
                    },
                ]
            }
        },
        "required": ["data"],
    }
    assert problems({"data": "[DONE]"}, schema, {}) == []
    assert problems({"data": '{"id": 1}'}, schema, {}) == []
    assert problems({"data": "{}"}, schema, {})
    assert problems({"data": "hello"}, schema, {})
    assert problems({}, schema, {}) == ["$: 'data' is required"]
    assert problems(True, {"type": "integer"}, {})


def test_an_excluded_candidate_without_its_card_matches_the_schema(server):
    """POST /store/select answered excluded candidates without ``card`` where the schema made
    ``card`` required: Candidate said NotRequired under ``from __future__ import annotations``,
    which Python 3.11's TypedDict does not see."""
    base, openapi = server
    content_type, body = post(
        base, "/store/select", {"requirement": {"max_params": 1}, "explain_excluded": 5}
    )
    answer = json.loads(body)
    assert content_type.startswith("application/json")
    assert answer["excluded"]
    assert all("card" not in candidate for candidate in answer["excluded"])
    schema = response_schema(openapi, "/store/select", "application/json")
    assert problems(answer, schema, openapi) == []
    candidate = openapi["components"]["schemas"]["Candidate"]
    assert "card" in candidate["properties"]
    assert "card" not in candidate["required"]

    content_type, body = post(base, "/store/select", {"limit": 3})
    answer = json.loads(body)
    assert [bool(candidate.get("card")) for candidate in answer["ranked"]] == [True] * 3
    assert problems(answer, schema, openapi) == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "echo", "prompt": ["one two", "three"], "n": 2}),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user", "content": "a b"}]},
        ),
    ],
    ids=["completions", "chat"],
)
def test_every_streamed_event_is_described_by_the_schema(server, path, body):
    """With ``stream: true`` the schema described the answer as one string, where each
    server-sent event is described (an object with ``data``, as schema-driven tools read a
    text/event-stream schema before OpenAPI 3.2): schemathesis failed every stream. Now each
    event's data is described: a chunk in OpenAI's format as JSON, or ``[DONE]``."""
    base, openapi = server
    content_type, raw = post(base, path, {**body, "stream": True})
    assert content_type.startswith("text/event-stream")
    events = [
        {"data": line.removeprefix("data: ")}
        for line in raw.decode().splitlines()
        if line.startswith("data: ")
    ]
    assert len(events) > 3
    assert events[-1] == {"data": "[DONE]"}
    schema = response_schema(openapi, path, "text/event-stream")
    for event in events:
        assert problems(event, schema, openapi) == [], event
    chunk = json.loads(events[0]["data"])
    chunk["choices"][0]["finish_reason"] = "done"
    assert problems({"data": json.dumps(chunk)}, schema, openapi)  # a wrong chunk is caught
    assert problems({"data": "not json"}, schema, openapi)


@pytest.mark.parametrize("value", ["", {}, {"mmlu": 0.5}, "mmlu"], ids=repr)
def test_a_list_of_objects_must_be_a_list(value):
    """cattrs structures any iterable into a list: ``"measured": ""`` or ``{}`` was accepted as
    no bounds (schemathesis: a request the schema refuses was answered 200), a dict as its keys."""
    for name in ("measured", "metric_floors"):
        with pytest.raises(InvalidInput) as excinfo:
            structure({name: value}, Requirement, what="requirement", using=json_converter)
        assert excinfo.value.problems == (
            f"expected a list, got {type(value).__name__} @ $.{name}",
        )
    with pytest.raises(InvalidInput, match=r"expected a list, got str @ \$"):
        structure("", list[MetricFloor], what="floors")
    floors = structure([{"name": "mmlu", "minimum": 0.5}], tuple[MetricFloor, ...], what="floors")
    assert floors == (MetricFloor("mmlu", 0.5),)
    with pytest.raises(InvalidInput, match=r"expected str, got int @ \$\[1\]\.name"):
        structure(
            [{"name": "a", "minimum": 1}, {"name": 2, "minimum": 1}], list[MetricFloor], what="f"
        )


def test_a_requirement_with_a_string_for_a_list_is_a_400(server):
    base, _openapi = server
    for requirement in ({"measured": ""}, {"metric_floors": {}}):
        status, _content_type, raw = call(base, "/store/select", {"requirement": requirement})
        assert status == 400, raw
        [name] = requirement
        assert "expected a list, got" in json.loads(raw)["error"]["message"]
        assert f"@ $.requirement.{name}" in json.loads(raw)["error"]["message"]
