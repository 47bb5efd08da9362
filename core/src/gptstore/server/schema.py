"""The OpenAPI description of what the server really accepts and answers.

Request bodies are read and checked by the handlers (with gptstore's converter, so errors name
their place); :func:`json_body` describes the same attrs classes in the schema, bounds included,
so generated clients and schema-driven tests see the rules the server applies. Responses are
described with the TypedDicts below; every error status with OpenAI's error shape.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import attrs
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)

# -- responses -----------------------------------------------------------------------------------


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    """OpenAI's error shape, for every error the server answers."""

    error: ErrorDetail


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(TypedDict):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    service_tier: Literal["default"]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[ChatTokenLogprob]


class FunctionCall(TypedDict):
    name: str
    arguments: str


class ToolCallBody(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _AssistantFields(TypedDict):
    role: Literal["assistant"]
    content: str | None


class AssistantMessage(_AssistantFields, total=False):
    """``content`` is null when the answer is tool calls only; ``tool_calls`` is there when the
    model called tools."""

    tool_calls: list[ToolCallBody]


class ChatChoice(TypedDict):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChatLogprobs | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: Literal["default"]


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    backend: str
    artifact: str
    #: For an adapter: the deployment whose base model it runs on; else null.
    parent: str | None


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]


class DeploymentReadiness(TypedDict):
    version: int
    replicas: dict[str, int]


class Readiness(TypedDict):
    ready: bool
    loading: list[str]
    draining: bool
    deployments: dict[str, DeploymentReadiness]


class Status(TypedDict):
    status: str


class PluginStatus(TypedDict):
    name: str
    module: str | None
    distribution: str | None
    version: str | None
    hooks: list[str]
    status: Literal["loaded", "failed", "disabled"]
    error: str | None
    builtin: bool


class Card(TypedDict):
    """A model card (docs/plugins/hooks.md lists its fields), its uid and whether it is listed."""

    uid: str
    source: str
    model_id: str
    listed: bool


class SearchResults(TypedDict):
    total: int
    results: list[Card]


class _CandidateFields(TypedDict):
    rank: int | None
    uid: str
    score: float | None
    breakdown: list[dict[str, Any]]
    failures: list[str]


class Candidate(_CandidateFields, total=False):
    """A ranked candidate comes with its ``card``; an excluded one without. (``total=False``, not
    ``NotRequired``: with ``from __future__ import annotations``, Python 3.11's TypedDict does not
    see NotRequired in a string annotation and lists ``card`` as required.)"""

    card: dict[str, Any]


class SelectionResult(TypedDict):
    policy: str
    requirement: dict[str, Any]
    total: int
    matched: int
    ranked_in: Literal["sql", "python"]
    ranked: list[Candidate]
    excluded: list[Candidate]


class ManifestBody(TypedDict):
    id: str
    kind: str
    parent: str | None
    origin: str | None


class ArtifactWithLineage(ManifestBody):
    lineage: list[dict[str, Any]]


class JobRequestBody(TypedDict):
    artifact: str
    strategy: str | None
    options: dict[str, Any]
    data: str | None
    recipe: dict[str, Any] | None
    recipe_file: str | None
    id: str | None


class JobStatus(TypedDict):
    """An optimization job (see :class:`gptstore.optimization.jobs.Job`)."""

    id: str
    request: JobRequestBody
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    message: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    by: str
    result: str | None
    error: str | None
    report: dict[str, Any] | None
    pid: int | None
    events: int


ERROR_DESCRIPTIONS = {
    400: "Invalid request: malformed JSON, wrong types, values out of range (each named with "
    "its place), or a prompt that does not fit the model's context (code "
    "context_length_exceeded)",
    401: "No API key, or an unknown one",
    403: "A user key on an endpoint that needs an admin key",
    404: "No such model, deployment, artifact, card or job",
    405: "The path does not have this method; Allow lists those it has",
    409: "The name is taken, another change of the deployment is under way, the server runs "
    "its max_replicas, or the job has already ended",
    413: "The body is larger than the server's max_body_bytes",
    422: "The new version failed to load, to answer its probes or to pass its gate (code "
    "swap_failed); the live version still serves",
    429: "The deployment's queue is full; retry after Retry-After seconds",
    500: "A server bug, or a plugin that broke its contract (code plugin_error)",
    503: "The deployment is loading or being deleted, has no ready replica, or the server is "
    "draining; retry after Retry-After seconds",
}


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """The given error statuses (and 405 and 500, which any operation may answer), each with
    OpenAI's error shape."""
    return {
        status: ResponseSpec(
            data_container=ErrorBody,
            description=ERROR_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in sorted({*statuses, 405, 500})
    }


#: Statuses every inference request may answer.
INFERENCE_ERRORS = errors(400, 401, 404, 413, 429, 503)


# -- request bodies ------------------------------------------------------------------------------


def _bounds(field: attrs.Attribute) -> dict[str, Any]:  # type: ignore[type-arg]
    """JSON Schema bounds of a field, from the converter's validators (they carry them)."""
    bounds: dict[str, Any] = {}
    validators = getattr(field.validator, "_validators", None) or (
        [field.validator] if field.validator else []
    )
    for validator in validators:
        bounds.update(getattr(validator, "json_schema", {}))
    return bounds


def schema_of(annotation: Any) -> Schema:
    """The JSON Schema of a type as gptstore's converter reads it (strict scalars, no extra
    keys)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return Schema()
    if attrs.has(annotation):
        return _attrs_schema(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [schema_of(a) for a in args]
        return Schema(one_of=options)
    if annotation is type(None):
        return Schema(type=OpenAPIType.NULL)
    if origin is Literal:
        return Schema(enum=list(args))
    if origin in (list, tuple):
        return Schema(type=OpenAPIType.ARRAY, items=schema_of(args[0]) if args else Schema())
    if origin is dict:
        return Schema(type=OpenAPIType.OBJECT, additional_properties=schema_of(args[1]))
    scalar = {
        str: OpenAPIType.STRING,
        int: OpenAPIType.INTEGER,
        float: OpenAPIType.NUMBER,
        bool: OpenAPIType.BOOLEAN,
    }
    return Schema(type=scalar[annotation])


def _attrs_schema(cls: type) -> Schema:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Schema | Reference] = {}
    required = []
    for field in attrs.fields(cls):
        override = field.metadata.get("json_schema")
        if isinstance(override, Schema):  # the field's whole schema
            schema = override
        else:  # keywords added to the schema of its type
            schema = schema_of(hints[field.name])
            for key, value in (override or {}).items():
                setattr(schema, key, value)
        for key, value in _bounds(field).items():
            if schema.one_of:  # an optional bounded number: bound the non-null branch
                for branch in schema.one_of:
                    if isinstance(branch, Schema) and branch.type != OpenAPIType.NULL:
                        setattr(branch, key, value)
            else:
                setattr(schema, key, value)
        if field.metadata.get("description"):
            schema.description = field.metadata["description"]
        properties[field.name] = schema
        if field.default is attrs.NOTHING:
            required.append(field.name)
    return Schema(
        type=OpenAPIType.OBJECT,
        properties=properties,
        required=required or None,
        additional_properties=False,
        title=cls.__name__,
        **getattr(cls, "json_schema_rules", {}),
    )


def json_body(cls: type, *, extra: dict[str, Schema | Reference] | None = None) -> type[Operation]:
    """An Operation class for a handler that reads its JSON body itself as ``cls`` (plus the
    ``extra`` properties, all required), so the schema shows that body."""
    schema = _attrs_schema(cls)
    if extra:
        schema.properties = {**extra, **(schema.properties or {})}
        schema.required = [*extra, *(schema.required or [])]

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                required=True, content={"application/json": OpenAPIMediaType(schema=schema)}
            )

    return WithBody


_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")
_CALL = ("name", "arguments")


def _chunk(kind: str, choice: dict[str, Schema]) -> Schema:
    """One streamed chunk in OpenAI's format: ``object`` is ``kind``, each choice has ``choice``'s
    fields besides ``index``, ``logprobs`` (null: log-probabilities are not streamed) and
    ``finish_reason``."""
    fields: dict[str, Schema | Reference] = {
        "index": Schema(type=OpenAPIType.INTEGER),
        **choice,
        "logprobs": Schema(type=OpenAPIType.NULL),
        "finish_reason": Schema(enum=["stop", "length", "tool_calls", None]),
    }
    return Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "id": Schema(type=OpenAPIType.STRING),
            "object": Schema(const=kind),
            "created": Schema(type=OpenAPIType.INTEGER),
            "model": Schema(type=OpenAPIType.STRING),
            "choices": Schema(
                type=OpenAPIType.ARRAY,
                items=Schema(type=OpenAPIType.OBJECT, properties=fields, required=list(fields)),
                description="Empty in the last chunk of a stream with "
                "stream_options.include_usage, which carries the usage",
            ),
            "usage": Schema(
                one_of=[
                    Schema(type=OpenAPIType.NULL),
                    Schema(
                        type=OpenAPIType.OBJECT,
                        properties={k: Schema(type=OpenAPIType.INTEGER) for k in _USAGE},
                        required=list(_USAGE),
                    ),
                ],
                description="With stream_options.include_usage: null, but in the last chunk",
            ),
            "service_tier": Schema(const="default"),
        },
        required=["id", "object", "created", "model", "choices"],
    )


#: A chunk of ``POST /v1/completions`` with ``stream: true``.
COMPLETION_CHUNK = _chunk("text_completion", {"text": Schema(type=OpenAPIType.STRING)})
#: A chunk of ``POST /v1/chat/completions`` with ``stream: true``: the first of each choice has
#: the role, the last only its finish_reason.
CHAT_CHUNK = _chunk(
    "chat.completion.chunk",
    {
        "delta": Schema(
            type=OpenAPIType.OBJECT,
            properties={
                "role": Schema(const="assistant"),
                "content": Schema(type=OpenAPIType.STRING),
                "tool_calls": Schema(
                    type=OpenAPIType.ARRAY,
                    items=Schema(
                        type=OpenAPIType.OBJECT,
                        properties={
                            "index": Schema(type=OpenAPIType.INTEGER),
                            "id": Schema(type=OpenAPIType.STRING),
                            "type": Schema(const="function"),
                            "function": Schema(
                                type=OpenAPIType.OBJECT,
                                properties={k: Schema(type=OpenAPIType.STRING) for k in _CALL},
                                required=list(_CALL),
                            ),
                        },
                        required=["index", "id", "type", "function"],
                    ),
                    description="Tool calls, each whole in one chunk",
                ),
            },
            additional_properties=False,
        )
    },
)


def sse_events(data: Schema) -> Schema:
    """The schema of each server-sent event of a stream whose events carry ``data`` as JSON and
    end with ``data: [DONE]``. (Before OpenAPI 3.2's ``itemSchema``, the ``schema`` of a
    ``text/event-stream`` describes one event: an object with ``data``, ``event``, ``id`` and
    ``retry``, as schema-driven tools such as schemathesis read it.)"""
    return Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "data": Schema(
                any_of=[
                    Schema(const="[DONE]"),
                    Schema(
                        type=OpenAPIType.STRING,
                        content_media_type="application/json",
                        content_schema=data,
                    ),
                ]
            ),
            "event": Schema(type=OpenAPIType.STRING),
            "id": Schema(type=OpenAPIType.STRING),
            "retry": Schema(type=OpenAPIType.INTEGER),
        },
        required=["data"],
        description="With stream: true, each server-sent event: `data: {chunk}` in OpenAI's "
        "chunk format, the last one `data: [DONE]`",
    )


def streaming_json_body(cls: type, chunk: Schema) -> type[Operation]:
    """:func:`json_body`, and a 200 that is either JSON or, with ``stream: true``, server-sent
    events whose data are ``chunk`` objects."""
    base = json_body(cls)

    @dataclass
    class WithStream(base):  # type: ignore[valid-type,misc]
        def __post_init__(self) -> None:
            super().__post_init__()
            ok = (self.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse) and ok.content is not None:
                ok.content["text/event-stream"] = OpenAPIMediaType(schema=sse_events(chunk))

    return WithStream
