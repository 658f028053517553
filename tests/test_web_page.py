"""The web chat page end to end: the real stack (Redis, Postgres, command API, projector, fanout as
processes) driven by headless Chromium through Playwright; plus the page's HTTP edge (CSP, dev tokens)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from command_api.app import create_app
from command_api.settings import CommandApiSettings
from devstack import pgadmin
from devstack.ports import free_port
from devstack.supervisor import Service, banner, child_env
from servicekit.exceptions import SettingError
from servicekit.httpedge import DEFAULT_CSP, EdgeMiddleware
from servicekit.settings import Env
from tests.fanout_fixtures import ROOT, fanout_env

CHROMIUM = Path(os.environ.get("PARLEY_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = ROOT / "tests" / "artifacts"
WAIT_MS = 15_000
SKIP_REASON = "BROWSER TEST SKIPPED: {} (run `make browser-deps`)"


@dataclass
class Stack:
    """The three services on free ports, one log and one database; the fanout can be killed and restarted."""

    env: dict[str, str]
    ports: dict[str, int]
    folder: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['command_api']}/"

    def spawn(self, module: str) -> None:
        with (self.folder / f"{module}.log").open("ab") as out:
            self.procs[module] = subprocess.Popen(
                [sys.executable, "-m", module], env=self.env, cwd=ROOT, stdout=out, stderr=out
            )

    def wait_ready(self, module: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.procs[module].poll() is None, f"{module} exited at start"
            try:
                if httpx.get(f"http://127.0.0.1:{self.ports[module]}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{module} did not become ready")

    def kill(self, module: str) -> None:
        proc = self.procs.pop(module)
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def stack(
    redis_server_url: str, database_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name = f"web_{uuid.uuid4().hex[:8]}"
    database_url = pgadmin.create_database(database_server_url, name)
    ports = {"command_api": free_port(), "projector": free_port(), "realtime_fanout": free_port()}
    page = f"http://127.0.0.1:{ports['command_api']}"
    env = fanout_env(
        redis_server_url, f"web{uuid.uuid4().hex[:6]}", DATABASE_URL=database_url,
        PARLEY_API_PORT=str(ports["command_api"]), PARLEY_PROJECTOR_HTTP_PORT=str(ports["projector"]),
        PARLEY_FANOUT_PORT=str(ports["realtime_fanout"]), PARLEY_ALLOWED_ORIGINS=page,
        PARLEY_WEB_QUERY_URL=f"http://127.0.0.1:{ports['projector']}",
        PARLEY_WEB_FANOUT_URL=f"ws://127.0.0.1:{ports['realtime_fanout']}/v1/stream",
        PARLEY_PROJECTOR_BLOCK_MS="200", PARLEY_RATE_LIMIT_PER_S="0", PARLEY_HTTP_ACCESS_LOG="1",
        PARLEY_FANOUT_PRESENCE_TTL_S="3",  # the killed fanout's connections expire soon
    )  # fmt: skip
    running = Stack(env, ports, tmp_path_factory.mktemp("web"))
    try:
        for module in ports:
            running.spawn(module)
        for module in ports:
            running.wait_ready(module)
        yield running
    finally:
        for proc in running.procs.values():
            proc.kill()
            proc.wait(10)
        pgadmin.drop_database(database_server_url, name)


# ---- the page's HTTP edge, no browser needed ----


def test_the_page_has_one_strict_csp_naming_the_read_side_and_other_answers_keep_the_default(
    stack: Stack,
) -> None:
    page = httpx.get(stack.page_url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policies = page.headers.get_list("content-security-policy")
    assert len(policies) == 1, policies
    csp = policies[0]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert f"connect-src 'self' http://127.0.0.1:{stack.ports['projector']} " in csp
    assert f"ws://127.0.0.1:{stack.ports['realtime_fanout']}" in csp
    asset = httpx.get(stack.page_url + "web/app.js")
    assert asset.headers["content-type"].startswith("text/javascript")
    assert asset.headers.get_list("content-security-policy") == [csp]
    for other in ("healthz", "web/nope.js", "openapi.json"):
        assert httpx.get(stack.page_url + other).headers.get_list("content-security-policy") == [DEFAULT_CSP]


def test_the_query_api_exposes_the_cursor_header_to_the_page(stack: Stack) -> None:
    origin = stack.page_url.rstrip("/")
    answer = httpx.get(f"http://127.0.0.1:{stack.ports['projector']}/healthz", headers={"Origin": origin})
    assert answer.headers["access-control-allow-origin"] == origin
    assert "X-Parley-Cursor" in answer.headers["access-control-expose-headers"]


def _app(dev_mode: bool) -> Any:
    env = {"PARLEY_JWT_SECRET": "s" * 40, "PARLEY_DEV_MODE": "1" if dev_mode else "0"}
    return EdgeMiddleware(create_app(CommandApiSettings.from_env(Env(env))), ())


async def test_dev_tokens_are_minted_only_in_dev_mode() -> None:
    body = {"user_id": "alice"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(True)), base_url="http://t") as http:
        minted = await http.post("/dev/token", json=body)
        assert minted.status_code == 200 and minted.json()["user_id"] == "alice"
        assert (await http.post("/dev/token", json={"user_id": "no spaces"})).status_code == 422
        assert (await http.post("/dev/token", json={"user": "x"})).status_code == 422
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(False)), base_url="http://t") as http:
        refused = await http.post("/dev/token", json=body)
        assert refused.status_code == 404 and refused.json()["type"] == "/problems/not-found"
        assert (await http.get("/web/config.json")).json()["dev_mode"] is False


def test_make_run_allows_the_page_origin_and_points_the_page_at_moved_ports() -> None:
    env = child_env({"PARLEY_API_PORT": "9000", "PARLEY_FANOUT_PORT": "9001"}, "redis://r", "pg://p", "s")
    assert env["PARLEY_ALLOWED_ORIGINS"] == "http://127.0.0.1:9000, http://localhost:9000"
    assert env["PARLEY_WEB_QUERY_URL"] == "http://127.0.0.1:8002"
    assert env["PARLEY_WEB_FANOUT_URL"] == "ws://127.0.0.1:9001/v1/stream"
    assert "Web chat page: http://127.0.0.1:8000/" in banner("r", "p", [Service("command_api", 8000)])


def test_the_page_urls_must_be_nameable_in_a_csp() -> None:
    base = {"PARLEY_JWT_SECRET": "s" * 40}
    for key, value in [("PARLEY_WEB_QUERY_URL", "javascript:alert(1)"),
                       ("PARLEY_WEB_FANOUT_URL", "ws://x; script-src *"),
                       ("PARLEY_WEB_FRAME_ANCESTORS", "https://a.example, *")]:  # fmt: skip
        with pytest.raises(SettingError, match=key):
            CommandApiSettings.from_env(Env({**base, key: value}))


# ---- in Chromium ----


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip(SKIP_REASON.format("the playwright package is not installed"))
    if not CHROMIUM.exists():
        pytest.skip(SKIP_REASON.format(f"no Chromium at {CHROMIUM}"))
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@dataclass
class User:
    name: str
    context: Any
    page: Any
    dialogs: list[str]

    def expect(self, selector: str) -> Any:
        from playwright.sync_api import expect

        return expect(self.page.locator(selector))

    def conversation(self, title: str) -> Any:
        return self.page.locator(".conversation-item", has_text=title)

    def open(self, title: str) -> None:
        self.conversation(title).click()
        self.expect("#conv-title").to_have_text(title)

    def send(self, text: str) -> None:
        """Keyboard only: the labelled message box, Enter."""
        box = self.page.get_by_label("Message", exact=True)
        box.fill(text)
        box.press("Enter")

    def bodies(self) -> list[str]:
        texts: list[str] = self.page.locator("#message-list li[data-seq] .body").all_inner_texts()
        return texts

    def settled(self) -> None:
        """Every message this page sent is confirmed (no optimistic one left)."""
        self.expect("#message-list .pending").to_have_count(0)

    def reload(self) -> None:
        """A fresh page: state from the query API only."""
        self.page.reload()
        self.page.locator("#login-name").fill(self.name)
        self.page.locator("#login-name").press("Enter")
        self.expect("#connection").to_have_attribute("data-state", "live")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def login(browser: Any, stack: Stack) -> Iterator[Callable[..., User]]:
    contexts: list[Any] = []

    def open_as(name: str, width: int = 1280, height: int = 800, shot: str | None = None) -> User:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        user = User(name, context, page, [])

        def on_dialog(dialog: Any) -> None:
            user.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("console", lambda message: print(f"[{name}] {message.type}: {message.text}"))
        page.on("requestfailed", lambda r: print(f"[{name}] failed: {r.method} {r.url} {r.failure}"))
        page.on(
            "response", lambda r: r.status >= 400 and print(f"[{name}] {r.status} {r.request.method} {r.url}")
        )
        page.goto(stack.page_url)
        page.get_by_label("Your name").fill(name)
        if shot:
            user.shot(shot)
        page.locator("#login-name").press("Enter")
        user.expect("#connection").to_have_attribute("data-state", "live")
        return user

    yield open_as
    for context in contexts:
        context.close()


def create(user: User, title: str, *people: str) -> None:
    user.page.locator(".new-conversation summary").click()
    user.page.locator("#create-title").fill(title)
    user.page.locator("#create-people").fill(", ".join(people))
    user.page.locator("#create-form button[type=submit]").click()
    user.expect("#conv-title").to_have_text(title)


def badge(user: User, title: str) -> Any:
    return user.expect(f'.conversation-item:has-text("{title}") .unread')


@pytest.mark.browser
def test_an_offline_reader_catches_up_exactly_once_with_edits_deletes_and_unread(
    login: Callable[..., User],
) -> None:
    alice, bob = login("alice", shot="desktop-login"), login("bob")
    create(alice, "Offline test", "bob")
    bob.expect('.conversation-item:has-text("Offline test")').to_be_visible()
    bob.open("Offline test")  # from now on bob's page folds this conversation's events into its cache
    create(bob, "Bob's notes")  # and looks at another one, so the first one's unread count grows

    bob.context.set_offline(True)
    bob.expect("#connection").to_have_attribute("data-state", "offline")
    sent = [f"m{i:02d}" for i in range(1, 21)]
    for text in sent:
        alice.send(text)
    alice.settled()
    alice.expect("#message-list li[data-seq]").to_have_count(20)
    expected = list(sent)
    for index in (2, 6):  # edit m03 and m07
        message = alice.page.locator("#message-list li[data-seq]").nth(index)
        message.get_by_role("button", name="Edit").click()
        alice.send(f"{sent[index]} edited")
        expected[index] = f"{sent[index]} edited"
    for index in (4, 9):  # delete m05 and m10
        message = alice.page.locator("#message-list li[data-seq]").nth(index)
        message.get_by_role("button", name="Delete").click()
        message.get_by_role("button", name="Confirm delete").click()
        expected[index] = "message deleted"
    alice.expect('#message-list li[data-state="deleted"]').to_have_count(2)
    alice.expect('#message-list li[data-state="edited"]').to_have_count(2)
    alice.shot("desktop-conversation")

    bob.context.set_offline(False)
    bob.expect("#connection").to_have_attribute("data-state", "live")
    badge(bob, "Offline test").to_have_text("18")
    bob.expect('.conversation-item:has-text("Offline test") .preview').to_have_text("alice: m20")
    bob.shot("desktop-conversation-list")
    bob.open("Offline test")
    bob.expect("#message-list li[data-seq]").to_have_count(20)
    assert bob.bodies() == expected
    seqs = bob.page.locator("#message-list li[data-seq]").evaluate_all("els => els.map(e => +e.dataset.seq)")
    assert seqs == sorted(set(seqs))
    badge(bob, "Offline test").to_be_hidden()
    alice.expect("#message-list .receipt").to_have_text("Seen by bob")
    assert alice.dialogs == bob.dialogs == []


@pytest.mark.browser
def test_the_page_reconnects_by_itself_when_the_fanout_restarts_and_loses_or_doubles_nothing(
    login: Callable[..., User], stack: Stack
) -> None:
    alice, bob = login("alice"), login("bob")
    create(alice, "Restart test", "bob")
    alice.send("before")
    bob.open("Restart test")
    bob.expect("#message-list li[data-seq] .body").to_have_text(["before"])

    stack.kill("realtime_fanout")
    bob.expect("#connection").not_to_have_attribute("data-state", "live")
    during = [f"during {i}" for i in range(5)]
    for text in during:
        alice.send(text)
    alice.settled()
    bob.expect("#connection").to_have_attribute("data-state", "polling")  # the REST fallback meanwhile
    bob.expect("#message-list li[data-seq]").to_have_count(6)
    stack.spawn("realtime_fanout")
    stack.wait_ready("realtime_fanout")
    alice.send("after")
    for user in (alice, bob):
        user.expect("#connection").to_have_attribute("data-state", "live")
        user.expect("#message-list li[data-seq]").to_have_count(7)
        assert user.bodies() == ["before", *during, "after"]


@pytest.mark.browser
def test_typing_presence_and_read_receipts_show_and_clear(login: Callable[..., User]) -> None:
    alice, bob = login("alice"), login("bob")
    create(alice, "Signals", "bob")
    alice.send("hello")  # alice acted here, so bob may see her presence (scope `engaged`)
    bob.open("Signals")
    alice.expect("#message-list .receipt").to_have_text("Seen by bob")
    bob.reload()  # a fresh subscribe: the snapshot now holds alice
    bob.expect('#presence li[data-user="alice"]').to_have_attribute("data-online", "true")
    bob.open("Signals")
    alice.page.locator("#composer-input").press_sequentially("typing a reply")
    bob.expect("#typing").to_have_text("alice is typing…")
    alice.page.locator("#composer-input").press("Enter")
    bob.expect("#typing").to_have_text("")
    bob.expect("#message-list li[data-seq] .body").to_have_text(["hello", "typing a reply"])
    alice.expect("#message-list li[data-seq]:last-child .receipt").to_have_text("Seen by bob")
    badge(bob, "Signals").to_be_hidden()
    bob.shot("desktop-signals")
    alice.page.goto("about:blank")  # alice leaves: her only connection closes
    bob.expect('#presence li[data-user="alice"]').to_have_attribute("data-online", "false")


HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "javascript:alert(2)",
    "[click me](javascript:alert(3))",
    "<script>alert(4)</script> and https://example.com/a?b=1 too",
]


@pytest.mark.browser
def test_hostile_text_renders_literally_and_runs_nothing(login: Callable[..., User]) -> None:
    alice, bob = login("alice"), login("bob", width=360, height=740, shot="mobile-login")
    create(alice, "Hostile", "bob")
    for text in HOSTILE:
        alice.send(text)
    alice.settled()
    bob.shot("mobile-conversation-list")
    bob.open("Hostile")
    bob.expect("#message-list li[data-seq]").to_have_count(len(HOSTILE))
    assert bob.bodies() == HOSTILE
    assert bob.page.locator("#message-list img, #message-list script").count() == 0
    links = bob.page.locator("#message-list a")
    assert links.evaluate_all("els => els.map(e => e.href)") == ["https://example.com/a?b=1"]
    for body in bob.page.locator("#message-list .body").all()[:3]:
        body.click()
    bob.shot("mobile-conversation")
    for user in (alice, bob):
        assert user.page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    assert re.search(r"<img", bob.page.locator("#message-list").inner_text())
    assert alice.dialogs == bob.dialogs == []


def api_token(stack: Stack, user: str) -> str:
    answer = httpx.post(stack.page_url + "dev/token", json={"user_id": user})
    token: str = answer.json()["token"]
    return token


@pytest.mark.browser
def test_scroll_back_reply_search_participants_and_archive(login: Callable[..., User], stack: Stack) -> None:
    alice, bob = login("alice"), login("bob")
    create(alice, "Paging", "bob")
    conversation = alice.page.locator(".conversation-item", has_text="Paging").get_attribute(
        "data-conversation-id"
    )
    auth = {"Authorization": f"Bearer {api_token(stack, 'alice')}"}
    with httpx.Client(base_url=stack.page_url, headers=auth) as http:
        for i in range(1, 61):  # more than a page (50), straight to the command API
            sent = http.post(f"v1/conversations/{conversation}/messages", json={"body": f"p{i:02d}"})
            assert sent.status_code == 202
    bob.reload()  # the history comes from the query API, a page at a time
    bob.open("Paging")
    bob.expect("#message-list li[data-seq]").to_have_count(50)
    # Scrolling to the top loads the older page (a click on "Load older messages" would scroll there
    # first, and the page would load it before the click lands).
    # The scroll event is dispatched too: a box already at the top would send none for scrollTop = 0.
    bob.page.locator("#messages").evaluate(
        "box => { box.scrollTop = 0; box.dispatchEvent(new Event('scroll')); }"
    )
    bob.expect("#message-list li[data-seq]").to_have_count(60)
    assert bob.bodies() == [f"p{i:02d}" for i in range(1, 61)]
    bob.expect("#older").to_be_hidden()

    bob.page.locator("#message-list li[data-seq]").last.get_by_role("button", name="Reply").click()
    bob.send("re: last")
    bob.expect("#message-list li[data-seq] .quote").to_have_text(["↪ alice: p60"])
    alice.open("Paging")
    alice.expect("#message-list li[data-seq]:last-child .quote").to_have_text("↪ alice: p60")

    bob.page.locator("#search-q").fill("p42")
    bob.page.locator("#search-q").press("Enter")
    bob.expect("#search-results .search-hit").to_have_count(1)
    bob.expect("#search-results .search-hit .preview").to_have_text("alice: p42")

    alice.page.locator(".participants summary").click()
    alice.page.locator("#add-user").fill("carol")
    alice.page.locator("#add-user").press("Enter")
    alice.expect('#participants li:has-text("carol")').to_have_count(1)
    alice.page.get_by_role("button", name="Remove carol").click()
    alice.expect('#participants li:has-text("carol")').to_have_count(0)

    create(alice, "Later")  # bob is added to a conversation that began without him
    alice.send("before bob")
    alice.page.locator("#add-user").fill("bob")  # the participants panel is still open
    alice.page.locator("#add-user").press("Enter")
    bob.expect('.conversation-item:has-text("Later") .preview').to_have_text("No messages yet")  # not his
    alice.send("welcome bob")
    bob.expect('.conversation-item:has-text("Later") .preview').to_have_text("alice: welcome bob")

    bob.page.locator("#archive-toggle").click()
    bob.expect("#archive-toggle").to_have_text("Unarchive")
    bob.expect('#conversations .conversation-item:has-text("Paging")').to_have_count(0)
    bob.page.locator("#tab-archived").click()
    bob.expect('#conversations .conversation-item:has-text("Paging")').to_have_count(1)
    bob.shot("desktop-archived")
    bob.page.locator("#archive-toggle").click()
    bob.expect('#conversations .conversation-item:has-text("Paging")').to_have_count(0)
    bob.page.locator("#tab-inbox").click()
    bob.expect('#conversations .conversation-item:has-text("Paging")').to_have_count(1)


@pytest.mark.browser
def test_a_send_whose_answer_is_lost_is_retried_with_its_key_and_appears_once(
    login: Callable[..., User],
) -> None:
    alice, bob = login("alice"), login("bob")
    create(alice, "Lost answer", "bob")
    keys: list[str] = []

    def lose_the_first_answer(route: Any) -> None:
        keys.append(route.request.headers["idempotency-key"])
        if len(keys) == 1:
            route.fetch()  # the server appends the message; the page never hears back
            route.abort("connectionreset")
        else:
            route.continue_()

    alice.page.route("**/v1/conversations/*/messages", lose_the_first_answer)
    alice.send("only once")
    alice.settled()
    deadline = time.monotonic() + 10
    while len(keys) < 2 and time.monotonic() < deadline:  # the event may settle it before the retry
        alice.page.wait_for_timeout(50)
    bob.open("Lost answer")
    for user in (alice, bob):
        user.expect("#message-list li[data-seq]").to_have_count(1)
        assert user.bodies() == ["only once"]
    assert len(keys) >= 2 and len(set(keys)) == 1, keys
