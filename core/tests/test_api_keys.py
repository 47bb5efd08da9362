"""API keys given as the key itself, as its ``sha256:`` hash, or through an environment
variable, on a real uvicorn server with the echo backend; bad key settings stop the app before
it listens; ``gptstore key hash`` and ``gptstore key new`` make what config.toml holds."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import tomllib
import urllib.parse

import pytest
import tomli_w

import gptstore.testing.echo
from gptstore.errors import InvalidInput
from gptstore.server import create_app
from gptstore.testing import run_cli, running_server
from gptstore.testing.echo import echo_artifact

HASHED_ADMIN, HASHED_USER = "sk-hashed-admin", "sk-hashed-user"
ENV_ADMIN, ENV_USER = "sk-env-admin", "sk-env-user"
PLAIN_ADMIN, PLAIN_USER = "sk-plain-admin", "sk-plain-user"


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _manager():
    from gptstore.manager import make_plugin_manager

    manager = make_plugin_manager(entrypoints=False)
    manager.register_plugin(gptstore.testing.echo, "echo")
    return manager


def _home(tmp_path, api_keys):
    home = tmp_path / "home"
    echo_artifact(home / "artifacts")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": api_keys},
                "deployments": {"echo": {"artifact": "echo", "backend": "echo"}},
            }
        )
    )
    return home


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    api_keys = [
        {"key": sha256(HASHED_ADMIN), "role": "admin"},
        {"key": sha256(HASHED_USER).upper().replace("SHA256:", "sha256:")},  # any case of hex
        {"env": "GPTSTORE_TEST_ADMIN_KEY", "role": "admin"},
        # An environment variable may hold the hash, too.
        {"env": "GPTSTORE_TEST_USER_KEY_HASH", "role": "user"},
        {"key": PLAIN_ADMIN, "role": "admin"},
        {"key": PLAIN_USER, "role": "user"},
    ]
    home = _home(tmp_path_factory.mktemp("keys"), api_keys)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPTSTORE_TEST_ADMIN_KEY", ENV_ADMIN)
        patch.setenv("GPTSTORE_TEST_USER_KEY_HASH", sha256(ENV_USER))
        app = create_app(home, manager=_manager())
    # The variables were read when the config was checked: the server does not need them now.
    assert "GPTSTORE_TEST_ADMIN_KEY" not in os.environ
    with running_server(app) as base:
        yield base


def call(base, method, path, body=None, *, key=None, authorization=None):
    """(status, parsed JSON body or None) of one request."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if authorization is not None:
        headers["Authorization"] = authorization
    connection.request(
        method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers
    )
    answer = connection.getresponse()
    text = answer.read().decode()
    connection.close()
    return answer.status, (json.loads(text) if text else None)


def user_call(base, key):
    return call(base, "GET", "/v1/models", key=key)


def admin_call(base, key):
    # Deleting a deployment that does not exist: 404 past the guard, changes nothing.
    return call(base, "DELETE", "/store/deployments/nothing-here", key=key)


@pytest.mark.parametrize("key", [HASHED_ADMIN, ENV_ADMIN, PLAIN_ADMIN])
def test_admin_keys_in_every_form_may_change_state(server, key):
    status, body = user_call(server, key)
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["echo"]
    status, body = admin_call(server, key)
    assert status == 404, body


@pytest.mark.parametrize("key", [HASHED_USER, ENV_USER, PLAIN_USER])
def test_user_keys_in_every_form_run_inference_but_change_nothing(server, key):
    assert user_call(server, key)[0] == 200
    status, body = call(
        server,
        "POST",
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        key=key,
    )
    assert status == 200, body
    status, body = admin_call(server, key)
    assert status == 403
    assert "needs an admin key" in body["error"]["message"]


@pytest.mark.parametrize(
    "key",
    [
        "sk-wrong",
        HASHED_ADMIN + "x",
        HASHED_ADMIN[:-1],
        HASHED_ADMIN.upper(),
        sha256(HASHED_ADMIN),  # the hash in config.toml is not a key
        sha256(HASHED_ADMIN)[len("sha256:") :],
        "GPTSTORE_TEST_ADMIN_KEY",  # nor is the variable's name
    ],
)
def test_a_wrong_key_is_a_401(server, key):
    for request in (user_call, admin_call):
        status, body = request(server, key)
        assert status == 401
        assert body["error"]["message"] == "invalid API key"


def test_a_missing_key_is_a_401_and_the_scheme_is_case_insensitive(server):
    status, body = user_call(server, None)
    assert status == 401
    assert "missing API key" in body["error"]["message"]
    assert call(server, "GET", "/v1/models", authorization=f"bearer {HASHED_USER}")[0] == 200
    assert call(server, "GET", "/v1/models", authorization=f"Basic {HASHED_USER}")[0] == 401


def test_settings_compare_digests_only():
    from gptstore.server.settings import ApiKey, ServerSettings

    hashed = ApiKey(sha256("a-key").upper().replace("SHA256:", "sha256:"), role="admin")
    assert hashed.key == sha256("a-key")  # normalized to lowercase
    assert ApiKey(sha256("a-key").upper()).digest == hashed.digest
    assert hashed.digest == hashlib.sha256(b"a-key").digest()
    assert "a-key" not in repr(ApiKey("a-key"))
    settings = ServerSettings(api_keys=(hashed, ApiKey("b-key")))
    assert settings.role_of(b"a-key") == "admin"
    assert settings.role_of(b"b-key") == "user"
    assert settings.role_of(b"c-key") is None
    assert settings.role_of(sha256("a-key").encode()) is None


def _refused(tmp_path, api_keys):
    home = _home(tmp_path, api_keys)
    with pytest.raises(InvalidInput) as refused:
        create_app(home, manager=_manager())
    return str(refused.value)


@pytest.mark.parametrize(
    ("api_keys", "message", "place"),
    [
        (
            [{"key": "sk-ok"}, {"key": "sha256:abc123", "role": "admin"}],
            "starts with 'sha256:' but is not followed by 64 hex digits; write sha256:<hex of "
            "the sha256 of the key>, as `gptstore key hash` prints it",
            "$.server.api_keys[1].key",
        ),
        (
            [{"key": "sha256:" + "g" * 64}],
            "not followed by 64 hex digits",
            "$.server.api_keys[0].key",
        ),
        (
            [{"env": "GPTSTORE_TEST_NOT_SET"}],
            "environment variable GPTSTORE_TEST_NOT_SET is not set or is empty; set it to the "
            "key (or to its sha256:<hex>) in the environment the server starts in",
            "$.server.api_keys[0].env",
        ),
        (
            [{"env": "GPTSTORE_TEST_EMPTY"}],
            "environment variable GPTSTORE_TEST_EMPTY is not set or is empty",
            "$.server.api_keys[0].env",
        ),
        (
            [{"env": "GPTSTORE_TEST_SPACES"}],
            "environment variable GPTSTORE_TEST_SPACES: an API key must be non-empty printable "
            "ASCII without spaces",
            "$.server.api_keys[0].env",
        ),
        (
            [{"key": "sk-x", "env": "GPTSTORE_TEST_EMPTY"}],
            'give an API key as either key = "KEY" (or "sha256:<hex>": its hash, which '
            '`gptstore key hash` prints) or env = "VARIABLE" (an environment variable that '
            "holds it), not both",
            "$.server.api_keys[0]",
        ),
        ([{"role": "admin"}], 'give an API key as either key = "KEY"', "$.server.api_keys[0]"),
        (
            [{"key": "sk-x"}, {"key": sha256("sk-x"), "role": "admin"}],
            "api_keys[0] and api_keys[1] are the same key; give each key once",
            "$.server.api_keys",
        ),
        ([{"key": "sk x"}], "printable ASCII without spaces", "$.server.api_keys[0].key"),
    ],
)
def test_bad_key_settings_stop_the_app_before_it_listens(
    tmp_path, monkeypatch, api_keys, message, place
):
    monkeypatch.delenv("GPTSTORE_TEST_NOT_SET", raising=False)
    monkeypatch.setenv("GPTSTORE_TEST_EMPTY", "")
    monkeypatch.setenv("GPTSTORE_TEST_SPACES", "my secret key")
    refused = _refused(tmp_path, api_keys)
    assert refused.startswith("invalid [server] in ")
    assert message in refused
    assert f" @ {place}" in refused
    assert "my secret key" not in refused  # a secret is never repeated in a message


def hash_cli(stdin: str) -> subprocess.CompletedProcess[str]:
    """``gptstore key hash`` with ``stdin`` piped in (run_cli leaves stdin alone)."""
    return subprocess.run(
        [sys.executable, "-m", "gptstore.cli", "key", "hash"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_key_hash_prints_what_config_toml_may_hold():
    for stdin in ("sk-some-key", "sk-some-key\n", "sk-some-key\r\n"):
        result = hash_cli(stdin)
        assert result.returncode == 0, result.stderr
        assert result.stdout == sha256("sk-some-key") + "\n"
    for stdin, problem in [
        ("", "no key on stdin"),
        ("\n", "no key on stdin"),
        ("two words", "printable ASCII without spaces"),
        ("one\ntwo\n", "printable ASCII without spaces"),
        (sha256("x"), "that is a hash already"),
    ]:
        result = hash_cli(stdin)
        assert (result.returncode, result.stdout) == (1, ""), stdin
        assert problem in result.stderr
        assert "Traceback" not in result.stderr


def test_key_new_makes_a_key_that_the_server_accepts_by_its_hash_alone(tmp_path):
    result = run_cli("key", "new", "--role", "admin")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["key", "entry"]
    key = lines[0].removeprefix("key:").strip()
    entry = lines[1].removeprefix("entry:").strip()
    assert len(key) >= 43
    assert key not in entry
    assert tomllib.loads(f"e = {entry}")["e"] == {"key": sha256(key), "role": "admin"}
    assert "shown only this once" in result.stderr

    result = run_cli("key", "new", "--json")
    made = json.loads(result.stdout)
    assert made["role"] == "user"
    assert made["sha256"] == sha256(made["key"])
    assert tomllib.loads(f"e = {made['entry']}")["e"] == {"key": made["sha256"], "role": "user"}
    assert made["key"] != key  # random

    home = _home(tmp_path, [tomllib.loads(f"e = {entry}")["e"]])
    with running_server(create_app(home, manager=_manager())) as base:
        assert admin_call(base, key)[0] == 404
        assert admin_call(base, made["key"])[0] == 401
        assert admin_call(base, sha256(key))[0] == 401

    result = run_cli("key", "new", "--role", "root")
    assert result.returncode == 2
    assert "'root' is not one of 'user', 'admin'" in result.stderr
