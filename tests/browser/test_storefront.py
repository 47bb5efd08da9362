"""Each page of the storefront, as a person uses it, in Chromium (see conftest.py)."""

from __future__ import annotations

import itertools
import re

from playwright.sync_api import expect

from .conftest import ADMIN, USER, sign_in

PAGES = [
    ("/", "Catalog", "catalog"),
    ("/select", "Select a model", "select"),
    ("/artifacts", "Artifacts and lineage", "artifacts"),
    ("/artifacts/tiny", "tiny", "artifact"),
    ("/models/store:tiny", "tiny", "model-card"),
    ("/deployments", "Deployments", "deployments"),
    ("/deployments/echo", "echo", "deployment"),
    ("/chat", "Chat", "chat"),
    ("/jobs", "Optimization jobs", "jobs"),
]


def shoot(page, screenshots, name):
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)


def test_without_a_key_every_page_asks_to_sign_in(page, screenshots):
    for path, _title, _name in PAGES:
        response = page.goto(path)
        assert response.status == 401, path
        expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
        expect(page.get_by_label("API key")).to_be_visible()
    shoot(page, screenshots, "401-sign-in")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not one of this server's API keys")
    assert "not-a-key" not in page.url
    assert page.errors == []


def test_every_page_loads_signed_in(page, screenshots):
    sign_in(page)
    cookie = next(c for c in page.context.cookies() if c["name"] == "gptstore_session")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert cookie["expires"] == -1  # a session cookie: gone with the browser session
    assert ADMIN not in cookie["value"]
    for path, title, name in PAGES:
        response = page.goto(path)
        assert response.status == 200, path
        expect(page.get_by_role("heading", level=1)).to_have_text(title)
        assert ADMIN not in page.content()  # the key is never in a page
        shoot(page, screenshots, name)
    assert page.errors == []


def test_a_selection_explains_each_criterion_and_the_exclusions(page, screenshots):
    sign_in(page, USER)
    page.goto("/select")
    page.get_by_label("Task").fill("text-generation")
    page.get_by_label("Max parameters").fill("200M")
    page.get_by_label("Policy").select_option("balanced")
    page.get_by_role("button", name="Select").click()
    expect(page.get_by_role("heading", name=re.compile("Ranked by balanced"))).to_be_visible()
    first = page.locator("article.candidate").first
    expect(first.get_by_role("heading")).to_contain_text("store:tiny")
    rows = first.locator("table.breakdown tbody tr")
    criteria = [rows.nth(i).locator("th").inner_text() for i in range(rows.count())]
    assert {"quality", "size", "popularity", "recency"} <= set(criteria)
    expect(first).to_contain_text("parameters")  # the size criterion says why
    expect(page.get_by_role("heading", name="Excluded, and why")).to_be_visible()
    expect(page.locator("table").last).to_contain_text("store:echo")
    shoot(page, screenshots, "select-results")
    assert page.errors == []


def test_the_lineage_tree_shows_steps_with_their_options(page, screenshots):
    sign_in(page)
    page.goto("/jobs")
    page.get_by_label("Artifact", exact=True).select_option("tiny")
    page.get_by_label("Strategy").select_option("echo-copy")
    page.get_by_label("Options (JSON)").fill('{"seconds": 2, "steps": 8}')
    page.get_by_label("New artifact id (optional)").fill("tiny-copied")
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Job ")
    # Progress arrives on the page as it happens, then the page shows how it ended.
    expect(page.locator("#job-events li").nth(3)).to_be_visible(timeout=60_000)
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=60_000)
    expect(page.locator("#job-result")).to_contain_text("tiny-copied")
    expect(page.locator("#loss svg")).to_be_visible()
    shoot(page, screenshots, "job")
    page.goto("/artifacts")
    child = page.locator("ul.tree.root > li", has_text="tiny").locator("ul.tree > li").first
    expect(child).to_contain_text("tiny-copied")
    expect(child).to_contain_text("echo-copy")
    expect(child).to_contain_text("steps=8")
    expect(child).to_contain_text("copied_steps")
    child.locator("summary").first.click()  # a step folds away
    expect(child.locator("details").first).not_to_have_attribute("open", "")
    shoot(page, screenshots, "lineage")
    assert page.errors == []


def test_the_chat_streams_tokens_as_they_arrive(page, screenshots):
    sign_in(page, USER)
    page.goto("/chat")
    page.get_by_label("Deployment").select_option("echo")
    page.get_by_label("Message").fill("one two three four five six seven eight nine ten")
    # Record what the answer shows each time it changes: tokens must arrive one by one.
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
             document.getElementById('answer').textContent)).observe(
             document.getElementById('answer'), {childList: true, characterData: true,
             subtree: true}); }"""
    )
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#answer-stats")).to_contain_text("chunks", timeout=60_000)
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(seen) >= 5, seen  # grew step by step, not at once
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))
    assert "user: one two three" in seen[-1]
    shoot(page, screenshots, "chat-echo")
    page.get_by_label("Deployment").select_option("tiny")  # a real (tiny) model on torch
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#answer-stats")).to_contain_text("chunks", timeout=120_000)
    assert int(page.locator("#answer").get_attribute("data-chunks")) >= 1
    assert page.errors == []


def test_an_admin_deploys_and_swaps_from_the_page_and_a_user_cannot(page, screenshots):
    sign_in(page, USER)
    page.goto("/deployments")
    expect(page.get_by_role("heading", name="Deploy an artifact")).to_have_count(0)
    page.context.clear_cookies()
    sign_in(page, ADMIN)
    page.goto("/deployments")
    page.get_by_label("Name").fill("shop")
    page.get_by_label("Artifact", exact=True).select_option("echo")
    page.get_by_label("Backend", exact=True).select_option("echo")
    page.get_by_label("Replicas").fill("1")
    page.get_by_role("button", name="Deploy").click()
    expect(page.get_by_role("status")).to_have_text("deployment shop created", timeout=60_000)
    expect(page.locator(".facts")).to_contain_text("1: echo on echo")
    page.get_by_label("Backend options (JSON)").fill('{"uppercase": true}')
    page.get_by_role("button", name="Swap").click()
    expect(page.get_by_role("status")).to_contain_text("version swapped in", timeout=60_000)
    versions = page.locator("table").last
    expect(versions.locator("tbody tr").first).to_contain_text("live")
    expect(versions.locator("tbody tr").nth(1)).to_contain_text("replaced")
    shoot(page, screenshots, "deployment-swapped")
    page.get_by_role("button", name="Roll back").click()
    expect(page.get_by_role("status")).to_have_text("rolled back", timeout=60_000)
    expect(versions.locator("tbody tr").first).to_contain_text("rolled back to version 1")
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_have_text("deployment shop deleted", timeout=60_000)
    assert page.errors == []


def test_reading_works_without_javascript(browser, server, screenshots):
    context = browser.new_context(base_url=server, java_script_enabled=False)
    page = context.new_page()
    sign_in(page, USER)
    for path in ("/", "/artifacts", "/deployments/echo", "/jobs"):
        assert page.goto(path).status == 200, path
    page.goto("/select?run=1&task=text-generation&policy=balanced")
    expect(page.locator("article.candidate").first).to_contain_text("score")
    page.goto("/chat")
    page.get_by_label("Deployment").select_option("echo")
    page.get_by_label("Message").fill("red green blue")
    page.get_by_role("button", name="Send").click()  # a plain form post: the whole answer
    expect(page.locator("#answer")).to_contain_text("red green blue")
    shoot(page, screenshots, "chat-without-javascript")
    context.close()


def test_keyboard_and_phone_width(browser, server, screenshots):
    context = browser.new_context(base_url=server, viewport={"width": 390, "height": 844})
    page = context.new_page()
    sign_in(page)
    for path in ("/", "/select?run=1&task=text-generation", "/deployments/echo", "/artifacts"):
        page.goto(path)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)  # nothing wider than a phone's screen
    shoot(page, screenshots, "phone-deployment")
    page.goto("/")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Search")).to_be_focused()  # straight to the page's first control
    page.keyboard.type("tiny")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"q=tiny"))
    expect(page.get_by_role("link", name="store:tiny")).to_be_visible()
    context.close()
