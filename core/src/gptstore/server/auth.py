"""API keys: routes say ``opt={"role": "user" | "admin" | None}``; keys come from
``Authorization: Bearer KEY`` and are recognised by their sha256 alone
(:meth:`~gptstore.server.settings.ServerSettings.role_of`), or from a storefront session
(:mod:`gptstore.server.sessions`): its cookie stands for the key it was opened with, and a
state-changing request made with it must carry the session's CSRF token."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from gptstore.server.sessions import COOKIE, CSRF_HEADER, Session, Sessions, csrf_ok
from gptstore.server.settings import ServerSettings


async def require_role(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard. (Async and reading the raw headers: it runs on every inference request, where a
    sync guard would cost a worker-thread hop.)"""
    needed = handler.opt.get("role")
    if needed is None or connection.scope.get("method") == "OPTIONS":  # says only what exists
        return
    settings: ServerSettings = connection.app.state.settings
    header = next((v for k, v in connection.scope["headers"] if k == b"authorization"), b"")
    key = header[7:].strip() if header[:7].lower() == b"bearer " else b""
    if key:
        role = settings.role_of(key)  # one sha256, compared in constant time with every key's
        if role is None:
            raise NotAuthorizedException("invalid API key")
    else:
        session = session_of(connection)
        if session is None:
            if needed == "user" and settings.anonymous_inference:
                return
            raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
        unsafe = connection.scope.get("method") not in ("GET", "HEAD")
        checked_by_form = handler.opt.get("csrf") == "form"  # its handler reads the field
        if (
            unsafe
            and not checked_by_form
            and not csrf_ok(session, connection.headers.get(CSRF_HEADER))
        ):
            raise PermissionDeniedException(
                "a request signed in by the storefront's cookie must send its CSRF token "
                "(X-CSRF-Token)"
            )
        role = session.role
    if needed == "admin" and role != "admin":
        raise PermissionDeniedException("this endpoint changes state and needs an admin key")


def changed_by(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who makes a change, as records keep it: the key's digest (never the key), or
    ``anonymous``."""
    header = connection.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else ""
    settings: ServerSettings = connection.app.state.settings
    if key:
        return settings.key_id(key.encode("latin-1"))
    session = session_of(connection)
    return session.key_id if session is not None else "anonymous"


def session_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Session | None:
    """The storefront session the request's cookie names, if any."""
    sessions: Sessions | None = getattr(connection.app.state, "sessions", None)
    if sessions is None:
        return None
    return sessions.get(connection.cookies.get(COOKIE), touch=not refreshing(connection))


#: The header a page's live refresh sends (store.js): it reads, and keeps no session alive.
REFRESH_HEADER = "x-gptstore-refresh"


def refreshing(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Whether the request is a page refreshing itself, not a person."""
    return connection.headers.get(REFRESH_HEADER) == "1"
