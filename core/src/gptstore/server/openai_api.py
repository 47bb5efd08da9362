"""OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream: true`` as server-sent events in OpenAI's chunk format).

Bodies are structured strictly with gptstore's converter: a field OpenAI has but gptstore does
not implement (``tools``, ``response_format``...) is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

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
    ModelList,
    Usage,
    errors,
    streaming_json_body,
)
from gptstore.types import ChatMessage, Generation, GenerationRequest, TokenLogprob

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
        "role": Schema(enum=["system", "developer", "user", "assistant"]),
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
            ]
        ),
    },
    required=["role", "content"],
)
_MESSAGES = Schema(type=OpenAPIType.ARRAY, items=_MESSAGE, min_items=1)


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
    stream: bool = False
    user: str | None = None


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

    #: Rules across fields, for the OpenAPI schema: top_logprobs needs logprobs: true.
    json_schema_rules: ClassVar[dict[str, Any]] = {
        "schema_if": Schema(
            properties={"top_logprobs": Schema(type=OpenAPIType.INTEGER)},
            required=["top_logprobs"],
        ),
        "then": Schema(properties={"logprobs": Schema(const=True)}, required=["logprobs"]),
    }

    def __attrs_post_init__(self) -> None:
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


def _messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    messages = []
    for index, message in enumerate(raw):
        role, content = message.get("role"), message.get("content")
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
            content = "".join(p["text"] for p in content)
        if role not in ("system", "user", "assistant", "developer") or not isinstance(content, str):
            raise InvalidInput(
                "request",
                [
                    f"each message needs a role (system, user, assistant) and text content "
                    f"@ $.messages[{index}]"
                ],
            )
        messages.append(ChatMessage("system" if role == "developer" else role, content))
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
        return {
            "object": "list",
            "data": [
                {
                    "id": d.name,
                    "object": "model",
                    "created": int(d.created_at.timestamp()),
                    "owned_by": "gptstore",
                    "backend": d.backend,
                    "artifact": d.artifact.id,
                }
                for d in deployments.list()
            ],
        }

    @post(
        "/completions",
        status_code=200,
        operation_class=streaming_json_body(CompletionBody, COMPLETION_CHUNK),
        responses=INFERENCE_ERRORS,
    )
    async def completions(self, state: State, request: Request[Any, Any, Any]) -> Completion:
        body = await read_body(request, CompletionBody)
        _no_streamed_logprobs(body.stream, body.logprobs is not None)
        deployment: Served = state.deployments.get(body.model)
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS["completions"]
        requests = [
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=None if body.seed is None else body.seed + j,
                stop=_stops(body.stop),
                logprobs=body.logprobs,
            )
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
            "model": deployment.name,
        }
        if body.stream:
            return await _stream(  # type: ignore[return-value]  # described as text/event-stream
                request,
                deployment,
                requests,
                lambda index, chunk: {
                    **head,
                    "choices": [
                        {
                            "index": index,
                            "text": chunk.text,
                            "logprobs": None,
                            "finish_reason": chunk.finish_reason,
                        }
                    ],
                },
            )
        generations = await unless_gone(request, deployment.generate(requests))
        prompt_tokens = sum(g.prompt_tokens for g in generations[:: body.n])
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": deployment.name,
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
        deployment: Served = state.deployments.get(body.model)
        prompt = await deployment.chat_prompt(_messages(body.messages))
        max_tokens = next(
            (n for n in (body.max_completion_tokens, body.max_tokens) if n is not None),
            DEFAULT_MAX_TOKENS["chat"],
        )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=None if body.seed is None else body.seed + j,
                stop=_stops(body.stop),
                logprobs=logprobs,
            )
            for j in range(body.n)
        ]
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"model": deployment.name, "created": created, "id": ident}
        if body.stream:

            def chunk_event(index: int, chunk: Any) -> dict[str, Any]:
                delta = {"content": chunk.text} if chunk.text or chunk.finish_reason is None else {}
                return {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": index,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": chunk.finish_reason,
                        }
                    ],
                }

            def opening(index: int) -> dict[str, Any]:
                return {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }

            return await _stream(request, deployment, requests, chunk_event, opening)  # type: ignore[return-value]
        generations = await unless_gone(request, deployment.generate(requests))
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": deployment.name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": g.text},
                    "finish_reason": g.finish_reason,
                    "logprobs": _chat_logprobs(g.logprobs),
                }
                for i, g in enumerate(generations)
            ],
            "usage": _usage(generations, generations[0].prompt_tokens),
        }


async def _stream(
    request: Request[Any, Any, Any],
    deployment: Served,
    requests: list[GenerationRequest],
    event: Any,
    opening: Any = None,
) -> Stream:
    """Server-sent events, one choice after another, decoded by the deployment's worker. The
    first chunk is awaited before the response starts, so a bad request still gets a 4xx
    instead of a broken stream; a client that disconnects, before or during the stream, stops
    the decoding."""
    chunks = deployment.stream(requests)
    try:
        first = await unless_gone(request, anext(chunks))
    except StopAsyncIteration:
        first = None
    except ClientGone:
        await chunks.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        opened: set[int] = set()
        try:
            if first is not None:
                async for index, chunk in _chain(first, chunks):
                    if opening is not None and index not in opened:
                        opened.add(index)
                        yield f"data: {json.dumps(opening(index))}\n\n"
                    yield f"data: {json.dumps(event(index, chunk))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await chunks.aclose()

    # The content type goes in the headers: Litestar lets a handler's default (JSON) override a
    # Stream's media_type.
    return Stream(
        events(),
        headers={"content-type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
    )


async def _chain(
    first: tuple[int, StreamChunk], rest: AsyncIterator[tuple[int, StreamChunk]]
) -> AsyncIterator[tuple[int, StreamChunk]]:
    yield first
    async for item in rest:
        yield item
