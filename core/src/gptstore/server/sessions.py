"""The storefront's sign-in: an API key given once on the sign-in page becomes a session.

The browser keeps only a random session id, in a cookie that lives as long as the browser
session (no expiry date), ``HttpOnly`` (no script reads it) and ``SameSite=Strict`` (no other
site's page sends it); the key itself is never stored in the browser, never put in a page or a
URL. The server keeps, per session, the key's role and digest (who made a change, as records
say) and a CSRF token that every state-changing request made with the cookie must carry (a
form's hidden ``csrf`` field, or the ``X-CSRF-Token`` header of a script's request). Sessions
are in memory: a restarted server asks to sign in again. A session ends when its owner signs
out or after :data:`IDLE` seconds unused.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time

from attrs import define

COOKIE = "gptstore_session"
CSRF_HEADER = "x-csrf-token"
#: Seconds a session may stay unused.
IDLE = 8 * 3600
#: Sessions a server keeps (the oldest unused ones go first).
MOST = 10_000


@define
class Session:
    role: str
    key_id: str
    csrf: str
    used: float
    #: What the last action did, shown once on the next page.
    notice: str | None = None


class Sessions:
    """The server's sessions (thread-safe)."""

    def __init__(self) -> None:
        self._items: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, role: str, key_id: str) -> tuple[str, Session]:
        """A new session: (its id, for the cookie; the session)."""
        session_id = secrets.token_urlsafe(32)
        session = Session(role, key_id, secrets.token_urlsafe(24), time.monotonic())
        with self._lock:
            if len(self._items) >= MOST:
                oldest = min(self._items, key=lambda k: self._items[k].used)
                del self._items[oldest]
            self._items[session_id] = session
        return session_id, session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """The session, unless unknown or idle for IDLE seconds. ``touch``: the request is a
        person's (it keeps the session alive); a page's own refresh is not."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._items.get(session_id)
            if session is None:
                return None
            if now - session.used > IDLE:
                del self._items[session_id]
                return None
            if touch:
                session.used = now
            return session

    def close(self, session_id: str | None) -> None:
        with self._lock:
            self._items.pop(session_id or "", None)


def csrf_ok(session: Session, token: str | None) -> bool:
    """Whether ``token`` is the session's CSRF token (compared in constant time)."""
    return bool(token) and hmac.compare_digest(session.csrf.encode(), (token or "").encode())
