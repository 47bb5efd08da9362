"""What the router and a replica process say to each other over their socket.

Each message is a JSON object in a frame: a 4-byte big-endian length, then the UTF-8 JSON. JSON
and not pickle: a replica is a separate process, and nothing that crosses a socket is unpickled.
Errors travel as their class name, message and fields, and are raised again on the router's side
as the same :class:`~gptstore.errors.GptstoreError`, so HTTP answers them as if in-process.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from gptstore.errors import (
    Conflict,
    ContextLengthExceeded,
    GptstoreError,
    InvalidInput,
    NotFound,
    PluginError,
    RefusedModel,
    Unavailable,
)
from gptstore.serving.batching import Overloaded

HEADER = struct.Struct(">I")
#: The largest frame either side accepts (a reply of 128 long completions with log-probabilities
#: stays far below it).
MAX_FRAME = 256 * 2**20

_ERRORS: dict[str, type[GptstoreError]] = {
    cls.__name__: cls
    for cls in (
        ContextLengthExceeded,
        InvalidInput,
        NotFound,
        Conflict,
        Unavailable,
        PluginError,
        RefusedModel,
        Overloaded,
        GptstoreError,
    )
}


def frame(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the other side has closed (or died)."""
    try:
        header = await reader.readexactly(HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > MAX_FRAME:
            raise PluginError(f"a replica sent a frame of {size} bytes (most: {MAX_FRAME})")
        message: dict[str, Any] = json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return message


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as a message's ``error``; anything but a GptstoreError is a PluginError whose
    details stay in the replica's log."""
    if not isinstance(exc, GptstoreError):
        return {"type": "PluginError", "message": f"{type(exc).__name__}: {exc}"}
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, InvalidInput):
        fields.update(what=exc.what, problems=list(exc.problems))
    if isinstance(exc, Overloaded):
        fields["retry_after"] = exc.retry_after
    return fields


def error_from(fields: dict[str, Any]) -> GptstoreError:
    """The error a replica reported, as the class it raised (else a PluginError)."""
    cls = _ERRORS.get(str(fields.get("type")), PluginError)
    if issubclass(cls, InvalidInput):
        return cls(str(fields.get("what", "request")), list(fields.get("problems", [])))
    exc = cls.__new__(cls)
    Exception.__init__(exc, str(fields.get("message", "the replica failed")))
    if isinstance(exc, Overloaded):
        exc.retry_after = int(fields.get("retry_after", 1))
    return exc
