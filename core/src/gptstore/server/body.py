"""Request bodies: JSON read by the handlers themselves, so that every problem (malformed JSON,
nesting deep enough to exhaust the decoder's recursion, wrong types, values out of range) is a
400 that names its place, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Request

from gptstore.converter import json_converter, structure
from gptstore.errors import InvalidInput

T = TypeVar("T")
#: Deepest JSON nesting a body may have (a chat request needs 5 levels).
MAX_DEPTH = 64


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counted no further than ``limit`` + 1 (no recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        if isinstance(item, dict):
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
    return deepest


async def read_body(request: Request[Any, Any, Any], cls: type[T]) -> T:
    """The request's JSON body structured into ``cls``: a 400 naming the place for anything
    malformed, too deeply nested, of the wrong type or out of range."""
    raw = await request.body()
    try:
        data = msgspec.json.decode(raw)
    except RecursionError:
        raise InvalidInput("request", [f"JSON nested deeper than {MAX_DEPTH} levels"]) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput("request", [f"the body is not valid JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise InvalidInput("request", ["the body must be a JSON object @ $"])
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise InvalidInput("request", [f"JSON nested deeper than {MAX_DEPTH} levels"])
    return structure(data, cls, what="request", using=json_converter)
