"""Every error the server answers, in OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``, with the status that says what the client can do about it."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.types import ExceptionHandlersMap

from gptstore.errors import (
    Conflict,
    GptstoreError,
    InvalidInput,
    NotFound,
    PluginError,
    SwapFailed,
    Unavailable,
    UnknownName,
)
from gptstore.serving.batching import Overloaded

log = logging.getLogger("gptstore.server")

#: HTTP status -> OpenAI's error ``type``.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "swap_failed_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody reads the response."""


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Response[Any]:
    return Response(
        {
            "error": {
                "message": message,
                "type": ERROR_TYPES.get(status, "invalid_request_error"),
                "param": None,
                "code": code,
            }
        },
        status_code=status,
        headers=headers,
    )


def _public(request: Request[Any, Any, Any], message: str) -> str:
    """``message`` without the store's folder: the CLI names paths (they help there), but an
    HTTP client has no business learning where the server keeps its files."""
    store = getattr(request.app.state, "store", None)
    home = str(getattr(store, "home", "") or "")
    return message.replace(home, "$GPTSTORE_HOME") if home else message


def gptstore_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    message = _public(request, str(exc))
    if isinstance(exc, Overloaded):
        return error_response(
            429, message, "overloaded", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, Unavailable):
        return error_response(503, message, "unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, NotFound | UnknownName):
        return error_response(404, message, "not_found")
    if isinstance(exc, Conflict):
        return error_response(409, message, "conflict")
    if isinstance(exc, SwapFailed):
        return error_response(422, message, "swap_failed")
    if isinstance(exc, PluginError):  # a plugin broke its contract: the server's fault
        log.error("%s", exc)
        return error_response(500, message, "plugin_error")
    return error_response(400, message, exc.code if isinstance(exc, InvalidInput) else None)


def http_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    extra = getattr(exc, "extra", None)
    if exc.status_code == 400 and isinstance(extra, list) and extra:
        # Litestar's parameter checks: [{"message", "key", "source"}, ...] -> "... @ $.key".
        problems = [
            f"{item.get('message', 'invalid')} @ $.{item.get('key', '?')}"
            if isinstance(item, dict)
            else str(item)
            for item in extra
        ]
        message = f"invalid request: {'; '.join(problems)}"
    elif exc.status_code == 400 and extra:
        message = f"{exc.detail}: {extra}"
    # The exception's headers carry what the status promises: Allow on a 405 above all.
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


def client_gone(_request: Request[Any, Any, Any], _exc: Exception) -> Response[Any]:
    return Response(None, status_code=499)


def server_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected error", exc_info=exc)
    return error_response(
        500, f"internal error ({type(exc).__name__}); see the server log", "internal_error"
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    GptstoreError: gptstore_error,
    HTTPException: http_error,
    ClientGone: client_gone,
    Exception: server_error,
}
