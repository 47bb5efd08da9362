"""OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream: true`` as server-sent events in OpenAI's chunk format).

Bodies are structured strictly with gptstore's converter: a field OpenAI has but gptstore does
not implement (``audio``, ``store``, ``echo``...) is a 400 that names it, never silently ignored.
``user`` and ``service_tier`` are accepted and ignored (docs/http.md says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

from attrs import field, frozen
from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.response import Stream

from gptstore.converter import FieldProblem, at_least, in_range
from gptstore.deploy import Deployments, Served
from gptstore.errors import InvalidInput
from gptstore.protocols import StreamChunk
from gptstore.server.body import read_body
from gptstore.server.errors import ClientGone
from gptstore.server.schema import (
    CHAT_CHUNK,
    COMPLETION_CHUNK,
    INFERENCE_ERRORS,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionLogprobs,
    Model,
    ModelList,
    Usage,
    errors,
    streaming_json_body,
)
from gptstore.server.structured import (
    OPEN,
    parse_tools,
    response_constraint,
    tool_calls,
    tool_choice,
    tools_constraint,
    with_tools,
)
from gptstore.types import ChatMessage, Generation, GenerationRequest, TokenLogprob, ToolCall

T = TypeVar("T")
MAX_N = 16
#: The most completions one request may ask for (prompts x n): each is a row of a batch.
MAX_ROWS = 128
#: ``max_tokens`` when a request leaves it out (or sends null), per endpoint, as OpenAI's.
DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}
#: Most alternatives per token: ``logprobs`` of completions, ``top_logprobs`` of chat (OpenAI's).
MAX_COMPLETION_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20
SEED_RANGE = (-(2**63), 2**63 - 1)
#: Longest stop sequence, in characters.
MAX_STOP_CHARS = 256
#: Most tokens one request may bias.
MAX_LOGIT_BIAS = 1024

_TEXT = Schema(type=OpenAPIType.STRING)
_STOP_TEXT = Schema(type=OpenAPIType.STRING, max_length=MAX_STOP_CHARS)
_STOP = Schema(
    one_of=[
        Schema(type=OpenAPIType.NULL),
        _STOP_TEXT,
        Schema(type=OpenAPIType.ARRAY, items=_STOP_TEXT, max_items=4),
    ],
    description="Up to 4 sequences where generation stops (not included in the text)",
)
_PROMPT = Schema(
    one_of=[
        Schema(type=OpenAPIType.STRING, min_length=1),
        Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.STRING, min_length=1),
            min_items=1,
            max_items=MAX_ROWS,
        ),
    ],
    description="A prompt, or a list of prompts (token arrays are not supported)",
)
_MESSAGE = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "role": Schema(enum=["system", "developer", "user", "assistant", "tool"]),
        "content": Schema(
            one_of=[
                _TEXT,
                Schema(
                    type=OpenAPIType.ARRAY,
                    items=Schema(
                        type=OpenAPIType.OBJECT,
                        properties={"type": Schema(const="text"), "text": _TEXT},
                        required=["type", "text"],
                    ),
                ),
                Schema(type=OpenAPIType.NULL),
            ],
            description="Text (null only for an assistant message with tool_calls)",
        ),
        "name": _TEXT,
        "tool_calls": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(
                type=OpenAPIType.OBJECT,
                properties={
                    "id": _TEXT,
                    "type": Schema(const="function"),
                    "function": Schema(
                        type=OpenAPIType.OBJECT,
                        properties={"name": _TEXT, "arguments": _TEXT},
                        required=["name", "arguments"],
                    ),
                },
                required=["id", "type", "function"],
            ),
            description="An assistant message's calls",
        ),
        "tool_call_id": Schema(type=OpenAPIType.STRING, description="A tool message's call"),
    },
    required=["role"],
)
_MESSAGES = Schema(type=OpenAPIType.ARRAY, items=_MESSAGE, min_items=1)
_OBJECT = Schema(type=OpenAPIType.OBJECT)
_OPTIONAL_BOOL = Schema(one_of=[Schema(type=OpenAPIType.BOOLEAN), Schema(type=OpenAPIType.NULL)])
_OPTIONAL_BOOL = _OPTIONAL_BOOL
_FUNCTION_NAME = Schema(type=OpenAPIType.STRING, pattern="^[A-Za-z0-9_-]{1,64}$")


def _named_schema(field: str) -> Schema:
    """A named JSON Schema as OpenAI's request shapes hold one: ``json_schema`` of
    response_format (``field`` schema), a tool's ``function`` (``field`` parameters)."""
    return Schema(
        type=OpenAPIType.OBJECT,
        properties={
            "name": _FUNCTION_NAME,
            "description": _TEXT,
            field: _OBJECT,
            "strict": _OPTIONAL_BOOL,
        },
        required=["name"],
        additional_properties=False,
    )


_RESPONSE_FORMAT = Schema(
    one_of=[
        Schema(type=OpenAPIType.NULL),
        Schema(
            type=OpenAPIType.OBJECT,
            properties={"type": Schema(enum=["text", "json_object"])},
            required=["type"],
            additional_properties=False,
        ),
        Schema(
            type=OpenAPIType.OBJECT,
            properties={
                "type": Schema(const="json_schema"),
                "json_schema": _named_schema("schema"),
            },
            required=["type", "json_schema"],
            additional_properties=False,
        ),
    ],
    description="text, json_object (any JSON object) or json_schema: the answer is decoded "
    "under the schema's grammar, so it parses and validates",
)
_TOOLS = Schema(
    one_of=[
        Schema(type=OpenAPIType.NULL),
        Schema(
            type=OpenAPIType.ARRAY,
            max_items=128,
            items=Schema(
                type=OpenAPIType.OBJECT,
                properties={
                    "type": Schema(const="function"),
                    "function": _named_schema("parameters"),
                },
                required=["type", "function"],
                additional_properties=False,
            ),
        ),
    ]
)
_TOOL_CHOICE = Schema(
    one_of=[
        Schema(type=OpenAPIType.NULL),
        Schema(enum=["none", "auto", "required"]),
        Schema(
            type=OpenAPIType.OBJECT,
            properties={
                "type": Schema(const="function"),
                "function": Schema(
                    type=OpenAPIType.OBJECT,
                    properties={"name": _FUNCTION_NAME},
                    required=["name"],
                    additional_properties=False,
                ),
            },
            required=["type", "function"],
            additional_properties=False,
        ),
    ]
)


def _check_logit_bias(_instance: Any, _attribute: Any, value: dict[str, float] | None) -> None:
    if value is None:
        return
    if len(value) > MAX_LOGIT_BIAS:
        raise FieldProblem("logit_bias", f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
    for key, bias in value.items():
        if not key.isdigit():
            raise FieldProblem("logit_bias", f"logit_bias keys are token ids, got {key!r}")
        if not -100 <= bias <= 100:
            raise FieldProblem("logit_bias", f"logit_bias values lie in -100..100, got {bias}")


@frozen(kw_only=True)
class StreamOptions:
    include_usage: bool = False


@frozen(kw_only=True)
class _Sampling:
    """Fields both endpoints share, with OpenAI's bounds."""

    model: str
    temperature: float = field(default=1.0, validator=in_range(0, 2))
    top_p: float = field(default=1.0, validator=in_range(0, 1, open_low=True))
    top_k: int = field(default=0, validator=at_least(0))
    n: int = field(default=1, validator=in_range(1, MAX_N))
    stop: Any = field(default=None, metadata={"json_schema": _STOP})
    seed: int | None = field(default=None, validator=in_range(*SEED_RANGE))
    presence_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    frequency_penalty: float | None = field(default=None, validator=in_range(-2, 2))
    logit_bias: dict[str, float] | None = field(
        default=None,
        validator=_check_logit_bias,
        metadata={
            "description": "Token id (as a string) to a bias in -100..100 added to its logit"
        },
    )
    response_format: Any = field(default=None, metadata={"json_schema": _RESPONSE_FORMAT})
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: Accepted and ignored: an end-user id for OpenAI's abuse monitoring.
    user: str | None = None
    #: Accepted and ignored: one server has one tier (answers say ``default``).
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = None

    def __attrs_post_init__(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise FieldProblem("stream_options", "stream_options needs stream: true")

    def request(
        self,
        prompt: str,
        max_tokens: int,
        logprobs: int | None,
        row: int,
        constraint: Any,
        adapter: str | None,
    ) -> GenerationRequest:
        """The row-th completion of ``prompt``, with this body's sampling settings."""
        return GenerationRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=None if self.seed is None else self.seed + row,
            stop=_stops(self.stop),
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            constraint=constraint,
            adapter=adapter,
        )


@frozen(kw_only=True)
class CompletionBody(_Sampling):
    #: For the OpenAPI schema: prompts x n is at most MAX_ROWS.
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "all_of": [
            Schema(
                schema_if=Schema(properties={"n": Schema(const=n)}, required=["n"]),
                then=Schema(properties={"prompt": Schema(max_items=MAX_ROWS // n)}),
            )
            for n in range(2, MAX_N + 1)
        ]
    }

    prompt: Any = field(metadata={"json_schema": _PROMPT})
    max_tokens: int | None = field(default=None, validator=at_least(1))
    logprobs: int | None = field(default=None, validator=in_range(0, MAX_COMPLETION_LOGPROBS))


@frozen(kw_only=True)
class ChatBody(_Sampling):
    messages: list[dict[str, Any]] = field(metadata={"json_schema": _MESSAGES})
    max_tokens: int | None = field(default=None, validator=at_least(1))
    max_completion_tokens: int | None = field(default=None, validator=at_least(1))
    logprobs: bool = False
    top_logprobs: int | None = field(default=None, validator=in_range(0, MAX_TOP_LOGPROBS))
    tools: list[dict[str, Any]] | None = field(default=None, metadata={"json_schema": _TOOLS})
    tool_choice: Any = field(default=None, metadata={"json_schema": _TOOL_CHOICE})
    parallel_tool_calls: bool = True

    #: Rules across fields, for the OpenAPI schema: top_logprobs needs logprobs: true.
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "schema_if": Schema(
            properties={"top_logprobs": Schema(type=OpenAPIType.INTEGER)},
            required=["top_logprobs"],
        ),
        "then": Schema(properties={"logprobs": Schema(const=True)}, required=["logprobs"]),
    }

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldProblem("top_logprobs", "top_logprobs needs logprobs: true")


async def _until_disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request[Any, Any, Any], answer: Awaitable[T]) -> T:
    """``answer``, or ClientGone as soon as the client disconnects: the request leaves the
    deployment's queue instead of being decoded for nobody."""
    work = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work  # let it finish cancelling (a stream's generator closes its end)
        raise ClientGone
    return work.result()


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if (
        isinstance(stops, list)
        and len(stops) <= 4
        and all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        return tuple(s for s in stops if s)
    raise InvalidInput(
        "request",
        [
            f"stop must be a string or a list of up to 4 strings of at most {MAX_STOP_CHARS} "
            "characters @ $.stop"
        ],
    )


def _no_streamed_logprobs(stream: bool, logprobs: object) -> None:
    # A stream's chunks may join several tokens: their log-probabilities would be lost or
    # wrong, so the request is refused rather than answered with nulls.
    if stream and logprobs:
        raise InvalidInput(
            "request", ["logprobs are not streamed; leave out stream or logprobs @ $.logprobs"]
        )


def _prompts(prompt: Any) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInput(
            "request",
            [
                "prompt must be a string or a non-empty list of strings "
                "(token arrays are not supported) @ $.prompt"
            ],
        )
    if any(not p for p in prompts):
        raise InvalidInput("request", ["the prompt is empty @ $.prompt"])
    return prompts


def _content(message: dict[str, Any], index: int) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # content parts: text ones only
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise InvalidInput(
                "request",
                [
                    'only text content parts ({"type": "text", "text": "..."}) '
                    f"are supported @ $.messages[{index}].content"
                ],
            )
        return "".join(p["text"] for p in content)
    if content is not None and not isinstance(content, str):
        raise InvalidInput(
            "request", [f"content must be text or text parts @ $.messages[{index}].content"]
        )
    return content


def _calls(raw: Any, index: int) -> tuple[ToolCall, ...]:
    where = f"$.messages[{index}].tool_calls"
    if raw is None:
        return ()
    calls = []
    for j, call in enumerate(raw if isinstance(raw, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(call, dict)
            and isinstance(call.get("id"), str)
            and isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), str)
        ):
            raise InvalidInput(
                "request",
                [
                    'each tool call needs an id and a function {"name", "arguments"} '
                    f"@ {where}[{j}]"
                ],
            )
        calls.append(ToolCall(call["id"], function["name"], function["arguments"]))
    return tuple(calls)


def _messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    messages = []
    for index, message in enumerate(raw):
        role, content = message.get("role"), _content(message, index)
        calls = _calls(message.get("tool_calls"), index) if role == "assistant" else ()
        call_id = message.get("tool_call_id")
        if role not in ("system", "user", "assistant", "developer", "tool") or (
            content is None and not calls
        ):
            raise InvalidInput(
                "request",
                [
                    f"each message needs a role (system, user, assistant, tool) and text content "
                    f"(or, for an assistant, tool_calls) @ $.messages[{index}]"
                ],
            )
        if role == "tool" and not isinstance(call_id, str):
            raise InvalidInput(
                "request", [f"a tool message needs its tool_call_id @ $.messages[{index}]"]
            )
        messages.append(
            ChatMessage(
                "system" if role == "developer" else role,
                content or "",
                calls,
                call_id if role == "tool" else None,
            )
        )
    if not messages:
        raise InvalidInput("request", ["messages must not be empty @ $.messages"])
    return messages


def _usage(generations: list[Generation], prompt_tokens: int) -> Usage:
    completion = sum(g.completion_tokens for g in generations)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _completion_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    offsets, offset = [], 0
    for item in logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [i.token for i in logprobs],
        "token_logprobs": [i.logprob for i in logprobs],
        "top_logprobs": [dict(i.top) for i in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                "token": i.token,
                "logprob": i.logprob,
                "bytes": list(i.token.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in i.top
                ],
            }
            for i in logprobs
        ]
    }


class OpenAIController(Controller):
    path = "/v1"
    opt: Mapping[str, Any] = MappingProxyType({"role": "user"})

    @get("/models", sync_to_thread=False, responses=errors(401))
    def models(self, state: State) -> ModelList:
        deployments: Deployments = state.deployments
        models: list[Model] = []
        for d in deployments.list():
            created = int(d.created_at.timestamp())
            models.append(
                {
                    "id": d.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "gptstore",
                    "backend": d.backend,
                    "artifact": d.artifact.id,
                    "parent": None,
                }
            )
            models += [
                {
                    "id": adapter,
                    "object": "model",
                    "created": created,
                    "owned_by": "gptstore",
                    "backend": d.backend,
                    "artifact": adapter,
                    "parent": d.name,
                }
                for adapter in d.spec.adapters
            ]
        return {"object": "list", "data": models}

    @post(
        "/completions",
        status_code=200,
        operation_class=streaming_json_body(CompletionBody, COMPLETION_CHUNK),
        responses=INFERENCE_ERRORS,
    )
    async def completions(self, state: State, request: Request[Any, Any, Any]) -> Completion:
        body = await read_body(request, CompletionBody)
        _no_streamed_logprobs(body.stream, body.logprobs is not None)
        deployment, adapter = state.deployments.resolve(body.model)
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS["completions"]
        constraint = response_constraint(body.response_format)
        requests = [
            body.request(prompt, max_tokens, body.logprobs, j, constraint, adapter)
            for prompt in _prompts(body.prompt)
            for j in range(body.n)
        ]
        if len(requests) > MAX_ROWS:
            raise InvalidInput(
                "request",
                [
                    f"at most {MAX_ROWS} completions per request (prompts x n), got "
                    f"{len(requests)} @ $.prompt"
                ],
            )
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": adapter or deployment.name,
        }
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)

            def events(index: int, chunk: StreamChunk) -> list[dict[str, Any]]:
                choice = {
                    "index": index,
                    "text": chunk.text,
                    "logprobs": None,
                    "finish_reason": chunk.finish_reason,
                }
                return [{**head, "choices": [choice], **({"usage": None} if usage else {})}]

            return await _stream(  # type: ignore[return-value]  # described as text/event-stream
                request,
                deployment,
                requests,
                events,
                usage=(
                    lambda finals: {**head, "choices": [], "usage": _stream_usage(finals, body.n)}
                )
                if usage
                else None,
            )
        generations = await unless_gone(request, deployment.generate(requests))
        prompt_tokens = sum(g.prompt_tokens for g in generations[:: body.n])
        return {
            **head,  # type: ignore[typeddict-item]
            "choices": [
                {
                    "index": i,
                    "text": g.text,
                    "finish_reason": g.finish_reason,
                    "logprobs": _completion_logprobs(g.logprobs),
                }
                for i, g in enumerate(generations)
            ],
            "usage": _usage(generations, prompt_tokens),
            "service_tier": "default",
        }

    @post(
        "/chat/completions",
        status_code=200,
        operation_class=streaming_json_body(ChatBody, CHAT_CHUNK),
        responses=INFERENCE_ERRORS,
    )
    async def chat_completions(
        self, state: State, request: Request[Any, Any, Any]
    ) -> ChatCompletion:
        body = await read_body(request, ChatBody)
        _no_streamed_logprobs(body.stream, body.logprobs)
        tools = parse_tools(body.tools)
        choice = tool_choice(body.tool_choice, tools)
        constraint = tools_constraint(tools, choice, body.parallel_tool_calls)
        if constraint is not None and body.response_format not in (None, {"type": "text"}):
            raise InvalidInput(
                "request",
                [
                    "response_format and tools constrain the same answer: leave out one, or set "
                    'tool_choice to "none" @ $.response_format'
                ],
            )
        constraint = constraint or response_constraint(body.response_format)
        messages = with_tools(_messages(body.messages), tools, choice)
        deployment, adapter = state.deployments.resolve(body.model)
        prompt = await deployment.chat_prompt(messages)
        max_tokens = next(
            (n for n in (body.max_completion_tokens, body.max_tokens) if n is not None),
            DEFAULT_MAX_TOKENS["chat"],
        )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            body.request(prompt, max_tokens, logprobs, j, constraint, adapter)
            for j in range(body.n)
        ]
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": adapter or deployment.name,
            "service_tier": "default",
        }
        calling = bool(tools) and choice != "none"
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _ChatChunks(head, usage, calling, hold_all=calling and choice != "auto")
            return await _stream(  # type: ignore[return-value]  # described as text/event-stream
                request,
                deployment,
                requests,
                chunks.events,
                usage=(lambda finals: {**head, "choices": [], "usage": _stream_usage(finals, 1)})
                if usage
                else None,
            )
        generations = await unless_gone(request, deployment.generate(requests))
        return {
            **head,  # type: ignore[typeddict-item]
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    **_answer_message(g.text, g.finish_reason, calling),
                    "logprobs": _chat_logprobs(g.logprobs),
                }
                for i, g in enumerate(generations)
            ],
            "usage": _usage(generations, generations[0].prompt_tokens),
        }


def _answer_message(text: str, finish: str, calling: bool) -> dict[str, Any]:
    """A chat choice's message and finish_reason; with tools, its calls in OpenAI's shape."""
    content, calls = tool_calls(text) if calling else (text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [_call_json(c) for c in calls]
    return {"message": message, "finish_reason": "tool_calls" if calls else finish}


def _call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    return {
        **({"index": index} if index is not None else {}),
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _stream_usage(finals: dict[int, StreamChunk], n: int) -> Usage:
    """Usage of a whole stream from its choices' last chunks (each prompt counted once)."""
    prompt = sum(c.prompt_tokens or 0 for i, c in finals.items() if i % n == 0)
    completion = sum(c.completion_tokens or 0 for c in finals.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class _ChatChunks:
    """A chat stream's events: the role first, then content deltas; with tools, text that may
    be a tool call is held back until it is known, and calls go out whole, in OpenAI's
    ``tool_calls`` deltas, before a last chunk whose finish_reason is ``tool_calls``."""

    def __init__(self, head: dict[str, Any], usage: bool, calling: bool, hold_all: bool) -> None:
        self.head = {**head, **({"usage": None} if usage else {})}
        self.calling, self.hold_all = calling, hold_all
        self.opened: set[int] = set()
        self.held: dict[int, str] = {}
        self.flowing: set[int] = set()  # choices known to be text, streamed as they come

    def _event(self, index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head, "choices": [choice]}

    def events(self, index: int, chunk: StreamChunk) -> list[dict[str, Any]]:
        out = []
        if index not in self.opened:
            self.opened.add(index)
            out.append(self._event(index, {"role": "assistant", "content": ""}, None))
        text = chunk.text
        if self.calling and index not in self.flowing:
            held = self.held.get(index, "") + text
            undecided = self.hold_all or OPEN.startswith(held) or held.startswith(OPEN)
            if chunk.finish_reason is None and undecided:
                self.held[index] = held
                return out
            if self.hold_all or held.startswith(OPEN):
                content, calls = tool_calls(held)
                if calls:
                    if content:
                        out.append(self._event(index, {"content": content}, None))
                    deltas = [_call_json(c, i) for i, c in enumerate(calls)]
                    out.append(self._event(index, {"tool_calls": deltas}, None))
                    out.append(self._event(index, {}, "tool_calls"))
                    return out
            self.flowing.add(index)
            text = held
        if text or chunk.finish_reason is None:
            out.append(self._event(index, {"content": text}, None))
        if chunk.finish_reason is not None:
            out.append(self._event(index, {}, chunk.finish_reason))
        return out


async def _stream(
    request: Request[Any, Any, Any],
    deployment: Served,
    requests: list[GenerationRequest],
    events: Callable[[int, StreamChunk], list[dict[str, Any]]],
    usage: Callable[[dict[int, StreamChunk]], dict[str, Any]] | None = None,
) -> Stream:
    """Server-sent events, one choice after another, decoded by the deployment's worker. The
    first chunk is awaited before the response starts, so a bad request still gets a 4xx
    instead of a broken stream; a client that disconnects, before or during the stream, stops
    the decoding. With ``usage`` (stream_options.include_usage), a last chunk before ``[DONE]``
    has no choices and the usage of the whole stream."""
    chunks = deployment.stream(requests)
    try:
        first = await unless_gone(request, anext(chunks))
    except StopAsyncIteration:
        first = None
    except ClientGone:
        await chunks.aclose()
        raise

    async def sent() -> AsyncIterator[str]:
        finals: dict[int, StreamChunk] = {}
        try:
            if first is not None:
                async for index, chunk in _chain(first, chunks):
                    if chunk.finish_reason is not None:
                        finals[index] = chunk
                    for event in events(index, chunk):
                        yield f"data: {json.dumps(event)}\n\n"
            if usage is not None:
                yield f"data: {json.dumps(usage(finals))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()

    # The content type goes in the headers: Litestar lets a handler's default (JSON) override a
    # Stream's media_type.
    return Stream(
        sent(),
        headers={"content-type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
    )


async def _chain(
    first: tuple[int, StreamChunk], rest: AsyncIterator[tuple[int, StreamChunk]]
) -> AsyncIterator[tuple[int, StreamChunk]]:
    yield first
    async for item in rest:
        yield item
