"""The storefront over plain HTTP (the browser tests, tests/browser, drive it in Chromium):
sign-in sessions, CSRF on everything a session cookie changes, redirects that stay on the site,
pages that read without a script, and the figures it shows."""

from __future__ import annotations

import http.client
import re
import tomllib
import urllib.parse

import pytest
import tomli_w

from gptstore.server import create_app
from gptstore.testing import running_server

from .test_replicas import ADMIN, _home, _manager

USER = "storefront-user"


@pytest.fixture
def served(tmp_path):
    home = _home(tmp_path, {"echo": {"artifact": "echo", "backend": "echo", "replicas": 1}})
    config = home / "config.toml"
    settings = tomllib.loads(config.read_text())
    settings["server"]["api_keys"].append({"key": USER, "role": "user"})
    config.write_text(tomli_w.dumps(settings))
    with running_server(create_app(home, manager=_manager())) as base:
        yield base


def request(base, method, path, body=None, headers=None):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request(method, path, body, headers or {})
    response = connection.getresponse()
    data = response.read().decode()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def sign_in(base, key=ADMIN, next_page="/"):
    status, headers, _ = request(
        base, "POST", "/signin", urllib.parse.urlencode({"key": key, "next": next_page}), FORM
    )
    assert status == 303, headers
    cookie = headers["set-cookie"].split(";")[0]
    _, _, page = request(base, "GET", "/", headers={"Cookie": cookie})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    return cookie, csrf, headers["location"]


def test_a_session_cookie_stands_for_the_key_and_never_holds_it(served):
    assert request(served, "GET", "/")[0] == 401
    status, headers, _ = request(
        served, "POST", "/signin", urllib.parse.urlencode({"key": "wrong"}), FORM
    )
    assert status == 401
    assert "set-cookie" not in headers
    cookie, _csrf, _ = sign_in(served)
    assert ADMIN not in cookie
    _, headers, _ = request(served, "POST", "/signin", urllib.parse.urlencode({"key": ADMIN}), FORM)
    assert "HttpOnly" in headers["set-cookie"]
    assert "SameSite=strict" in headers["set-cookie"]
    assert "expires" not in headers["set-cookie"].lower()  # gone with the browser session
    assert "secure" not in headers["set-cookie"].lower()  # plain HTTP: a Secure cookie is lost
    status, _, body = request(served, "GET", "/store/deployments", headers={"Cookie": cookie})
    assert status == 200
    assert '"name":"echo"' in body.replace(" ", "")
    # Behind a TLS proxy (X-Forwarded-Proto from 127.0.0.1, which uvicorn trusts), the cookie
    # is Secure: the browser never sends it over plain HTTP.
    proxied = {**FORM, "X-Forwarded-Proto": "https"}
    _, headers, _ = request(
        served, "POST", "/signin", urllib.parse.urlencode({"key": ADMIN}), proxied
    )
    assert "Secure" in headers["set-cookie"]


def test_what_a_cookie_changes_needs_the_sessions_csrf_token(served):
    cookie, csrf, _ = sign_in(served)
    chat = '{"model": "echo", "messages": [{"role": "user", "content": "a b c"}]}'
    json_headers = {"Cookie": cookie, "Content-Type": "application/json"}
    status, _, body = request(served, "POST", "/v1/chat/completions", chat, json_headers)
    assert status == 403
    assert "CSRF" in body
    status, _, body = request(
        served, "POST", "/v1/chat/completions", chat, {**json_headers, "X-CSRF-Token": csrf}
    )
    assert status == 200, body
    form = urllib.parse.urlencode({"name": "x", "artifact": "echo", "backend": "echo"})
    status, _, _ = request(served, "POST", "/deployments", form, {**FORM, "Cookie": cookie})
    assert status == 403  # a form without the token
    status, headers, _ = request(
        served,
        "POST",
        "/deployments",
        urllib.parse.urlencode(
            {"name": "made", "artifact": "echo", "backend": "echo", "replicas": "1", "csrf": csrf}
        ),
        {**FORM, "Cookie": cookie},
    )
    assert status == 303
    assert headers["location"] == "/deployments/made"
    # What the action did shows once on the next page, from the session: not from the URL,
    # where any link could make the store claim something.
    notice = '<p class="notice" role="status">deployment made created</p>'
    _, _, page = request(served, "GET", "/deployments/made", headers={"Cookie": cookie})
    assert notice in page
    _, _, page = request(served, "GET", "/deployments/made", headers={"Cookie": cookie})
    assert 'class="notice"' not in page
    spoof = "/deployments?done=" + urllib.parse.quote("all your models were deleted")
    _, _, page = request(served, "GET", spoof, headers={"Cookie": cookie})
    assert "all your models were deleted" not in page


def test_a_user_session_reads_but_cannot_change(served):
    cookie, csrf, _ = sign_in(served, USER)
    assert request(served, "GET", "/deployments/echo", headers={"Cookie": cookie})[0] == 200
    status, _, page = request(
        served,
        "POST",
        "/deployments/echo/delete",
        urllib.parse.urlencode({"csrf": csrf}),
        {**FORM, "Cookie": cookie},
    )
    assert status == 403
    assert "needs an admin key" in page
    assert request(served, "GET", "/store/deployments/echo", headers={"Cookie": cookie})[0] == 200


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil"])
def test_sign_in_only_sends_back_to_this_site(served, target):
    _cookie, _csrf, location = sign_in(served, next_page=target)
    assert location == "/"


def test_signing_out_ends_the_session(served):
    cookie, csrf, _ = sign_in(served)
    status, _, _ = request(
        served,
        "POST",
        "/signout",
        urllib.parse.urlencode({"csrf": csrf}),
        {**FORM, "Cookie": cookie},
    )
    assert status == 303
    assert request(served, "GET", "/", headers={"Cookie": cookie})[0] == 401


def test_the_deployment_page_shows_its_requests_and_latency(served):
    cookie, _csrf, _ = sign_in(served)
    for _ in range(3):
        status, _, _ = request(
            served,
            "POST",
            "/v1/completions",
            '{"model": "echo", "prompt": "a b c", "max_tokens": 3}',
            {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        )
        assert status == 200
    _, _, page = request(served, "GET", "/deployments/echo", headers={"Cookie": cookie})
    assert re.search(r'class="big">3</span> requests \(3 × 200\)', page), page
    assert re.search(r'class="big">9</span> tokens generated', page)
    assert "<svg" in page  # the latency histogram
    assert ADMIN not in page


def test_a_pages_own_refresh_keeps_no_idle_session_alive():
    from gptstore.server.sessions import IDLE, Sessions

    sessions = Sessions()
    session_id, session = sessions.open("admin", "key sha256:0")
    session.used -= IDLE - 5  # idle nearly long enough to end
    before = session.used
    assert sessions.get(session_id, touch=False) is session  # a refresh: still idle
    assert session.used == before
    assert sessions.get(session_id) is session  # a person: alive again
    assert session.used > before
    session.used -= IDLE + 1
    assert sessions.get(session_id, touch=False) is None  # idle too long: gone
