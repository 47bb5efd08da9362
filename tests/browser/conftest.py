"""The storefront in a real browser: Playwright for Python driving Debian's chromium (no browser
download; ``GPTSTORE_CHROMIUM`` names the executable) against a real server on 127.0.0.1 serving
the echo backend and a tiny real model on the torch backend. Screenshots of each page go to
``GPTSTORE_SCREENSHOTS`` (the tox env: .tox/results/screenshots) for a person to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import tomli_w

import gptstore.testing.echo
from gptstore.manager import make_plugin_manager
from gptstore.server import create_app
from gptstore.testing import add_artifact, running_server
from gptstore.testing.echo import echo_artifact

ADMIN, USER = "browser-admin-key", "browser-user-key"


def chromium() -> str:
    path = os.environ.get("GPTSTORE_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        pytest.fail(
            "the browser tests need Chromium: apt-get install chromium (Debian), or set "
            "GPTSTORE_CHROMIUM to a Chromium executable"
        )
    return path


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("GPTSTORE_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def store_home(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("store") / "home"
    artifacts = home / "artifacts"
    echo_artifact(artifacts)
    add_artifact(artifacts, tiny_model, "tiny")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {
                    "api_keys": [
                        {"key": ADMIN, "role": "admin"},
                        {"key": USER, "role": "user"},
                    ]
                },
                "deployments": {
                    "echo": {
                        "artifact": "echo",
                        "backend": "echo",
                        "replicas": 2,
                        "options": {"word_delay": 0.05},
                    },
                    "tiny": {"artifact": "tiny", "backend": "torch", "replicas": 1},
                },
            }
        )
    )
    return home


@pytest.fixture(scope="session")
def server(store_home):
    previous = os.environ.get("GPTSTORE_HOME")
    os.environ["GPTSTORE_HOME"] = str(store_home)  # the store source lists this home's artifacts
    try:
        yield from _serve(store_home)
    finally:
        if previous is None:
            os.environ.pop("GPTSTORE_HOME", None)
        else:
            os.environ["GPTSTORE_HOME"] = previous


def _serve(store_home):
    manager = make_plugin_manager()  # the installed plugins (gptstore-torch), as a user has them
    manager.register_plugin(gptstore.testing.echo, "echo")
    from gptstore.catalog import Catalog
    from gptstore.config import Store
    from gptstore.sync import sync_catalog

    store = Store(store_home)
    sync_catalog(Catalog(store.catalog_path), manager, store.config())  # the store's own cards
    with running_server(create_app(store_home, manager=manager), timeout=300) as base:
        yield base


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # Script errors: none is allowed. (Chromium also logs each 4xx page it loads as a console
    # error; the tests check those statuses themselves.)
    page.errors = []
    page.on(
        "console",
        lambda m: (
            page.errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def sign_in(page, key=ADMIN):
    page.goto("/signin")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/")
