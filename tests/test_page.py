"""The page of `sfllava serve` (design.md §7.6) in a real browser: Debian's headless Chromium,
driven by Playwright for Python through its `data-testid` names, against the real server
(a subprocess on a free loopback port, tiny model).

References are independent of the page: the server's own API answers for the same
conversation (the `openai` client, and the page's own request body replayed with httpx),
and `sfllava frames --json --out` (its contact.png and visual tokens) for the sheet.
OpenBLAS is preloaded into the server only: Playwright's driver dies with it (NOTES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from sfllava_convert.tiny.command import REPO, Server, first_message, run_env, sfllava_command
from tests.conftest import FOLLOW_UP, QUESTION
from tests.serve_support import chatty_model, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.server]  # a real Chromium on a real server

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package: `make system-deps`)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not "
                               "installed (the test extra)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY = "sk-test-page"
WAIT_MS = 60_000  # bounds a hang only
LISTED = {"main.mkv", "clips/short.mkv", "picture.png", "notes.mp4"}


@pytest.fixture(scope="module")
def place(tmp_path_factory, videos):
    """A media dir with two videos (one in a folder), a picture, a text file named .mp4, and
    symlinks (a file and a folder) that point outside it."""
    tmp = tmp_path_factory.mktemp("page")
    media, outside = tmp / "media", tmp / "outside"
    (media / "clips").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(videos["main"], media / "main.mkv")
    shutil.copy(videos["short"], media / "clips" / "short.mkv")
    shutil.copy(videos["other"], outside / "secret.mkv")
    rng = np.random.default_rng(3)
    cv2.imwrite(str(media / "picture.png"), rng.integers(0, 256, (6, 8, 3), np.uint8).repeat(8, 0).repeat(8, 1))
    (media / "notes.mp4").write_text("this is a text file, not a video\n")
    (media / "link.mkv").symlink_to(outside / "secret.mkv")
    (media / "escape").symlink_to(outside, target_is_directory=True)
    (media / "readme.txt").write_text("not media\n")
    return {"tmp": tmp, "media": media, "outside": outside}


@pytest.fixture(scope="module")
def server(place, converted):
    s = Server(["--model", converted["oryx-vit"], "--media-dir", place["media"],
                "--max-tokens", 8, "--max-upload-mb", 1], place["tmp"])
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def keyed(place, converted, tmp_path_factory):
    """A server with --api-key whose model never ends an answer (something to stop)."""
    tmp = tmp_path_factory.mktemp("page-keyed")
    model = chatty_model(converted["oryx-vit"], tmp / "chatty")
    s = Server(["--model", model, "--media-dir", place["media"], "--api-key", KEY,
                "--num-frames", 8, "--max-tokens", 20000], tmp)
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    # The driver (node) and Chromium start without the OpenBLAS preload of this process.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        p = sync_api.sync_playwright().start()
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    try:
        yield b
    finally:
        b.close()
        p.stop()


class Tab:
    """A page in its own browser context, with every request it made."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.goto(url)

    def get(self, testid: str):
        return self.page.get_by_test_id(testid)

    def choose(self, name: str) -> None:
        self.get("video-item").filter(has_text=name).first.click()

    def upload(self, path: Path) -> None:
        self.get("upload").set_input_files(str(path))
        sync_api.expect(self.page.locator("#media-name")).to_have_text(path.name)  # read

    def ask(self, question: str, state: str = "done"):
        """Type a question, press Enter; the new answer's element once it is in `state`."""
        n = self.get("assistant-message").count()
        self.get("prompt").fill(question)
        self.get("prompt").press("Enter")
        answer = self.get("assistant-message").nth(n)
        sync_api.expect(answer).to_have_attribute("data-state", state)
        return answer

    def chat_bodies(self) -> list:
        return [json.loads(r.post_data) for r in self.requests
                if r.url.endswith("/v1/chat/completions")]

    def sheet(self) -> np.ndarray:
        """The contact sheet as shown, decoded from the image's own bytes."""
        sync_api.expect(self.get("contact-sheet")).to_have_attribute("data-state", "ready")
        data = self.page.evaluate("""async () => {
            const r = await fetch(document.querySelector('[data-testid="contact-sheet"]').src);
            return Array.from(new Uint8Array(await r.arrayBuffer())); }""")
        return cv2.imdecode(np.array(data, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server.url)
    try:
        yield t
    finally:
        t.close()


def api_answer(server, messages, options, key="none", **kw) -> str:
    r = server.client(key).chat.completions.create(
        model="mlx-oryx-vit", messages=messages, temperature=0, extra_body={"sfllava": options}, **kw)
    return r.choices[0].message.content


def frames_reference(video: Path, model: Path, out: Path, *flags) -> subprocess.Popen:
    """`sfllava frames --json --out`, started now (the reference sheet and visual tokens)."""
    return subprocess.Popen(sfllava_command(["frames", video, "--model", model, "--json", "--out", out,
                                             *flags]), stdout=subprocess.PIPE, text=True,
                            env=run_env(out.parent), cwd=REPO)


# ----------------------------------------------------------------------------------------


def test_the_list_holds_the_media_inside_and_nothing_outside(tab, server, place):
    with server.http() as h:
        listed = h.get("/v1/sfllava/media").json()["data"]
        assert {item["path"] for item in listed} == LISTED  # no secret.mkv through either link
        for url in (place["outside"] / "secret.mkv", place["media"] / "link.mkv",
                    place["media"] / "escape" / "secret.mkv", f"{place['media']}/../outside/secret.mkv"):
            for endpoint in ("sheet", "plan"):
                r = h.get(f"/v1/sfllava/{endpoint}", params={"path": str(url)})
                assert r.status_code == 403, (endpoint, url)
                assert r.json()["error"]["code"] == "path_not_allowed"
    sync_api.expect(tab.get("video-item")).to_have_count(len(LISTED))
    assert set(tab.get("video-item").all_inner_texts()) == LISTED


def test_the_sheet_and_plan_are_what_sfllava_frames_gives_and_follow_the_options(
        tab, server, place, converted, tmp_path):
    video, model = place["media"] / "main.mkv", converted["oryx-vit"]
    refs = {n: frames_reference(video, model, tmp_path / f"ref{n or ''}",
                                *(["--num-frames", n] if n else [])) for n in (None, 8)}
    tab.choose("main.mkv")
    shown = tab.sheet()
    sync_api.expect(tab.get("visual-tokens")).not_to_have_text("–")
    tokens = tab.get("visual-tokens").inner_text()
    plan = tab.get("memory-plan").inner_text()
    tab.get("num-frames").fill("8")
    sync_api.expect(tab.get("frames")).to_have_text("8")
    shown8 = tab.sheet()
    for n, proc in refs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        ref = json.loads(out)
        sheet = cv2.imread(str(tmp_path / f"ref{n or ''}" / "contact.png"))
        got, got_tokens = (shown, tokens) if n is None else (shown8, tab.get("visual-tokens").inner_text())
        assert got.shape == sheet.shape and np.array_equal(got, sheet)  # PNG: lossless
        assert got_tokens == str(ref["visual_tokens"])
    assert shown.shape != shown8.shape
    # The memory plan is Engine.plan's, with the server's options.
    from sfllava_mlx import Engine

    assert plan == Engine(model).plan(video, max_tokens=8).describe()


def test_an_answer_equals_the_api_and_a_follow_up_extends_the_held_conversation(tab, server, place):
    tab.choose("main.mkv")
    tab.get("num-frames").fill("8")  # in force when the conversation starts
    sync_api.expect(tab.get("frames")).to_have_text("8")
    answer = tab.ask(QUESTION)
    text = answer.get_by_test_id("assistant-text").text_content()
    assert text and answer.get_by_test_id("figures").get_attribute("data-cache") == "miss"
    # A change now redraws the sheet but belongs to the next conversation.
    tab.get("num-frames").fill("16")
    sync_api.expect(tab.get("frames")).to_have_text("16")
    follow = tab.ask(FOLLOW_UP)
    follow_text = follow.get_by_test_id("assistant-text").text_content()
    assert follow.get_by_test_id("figures").get_attribute("data-cache") == "held"
    assert "tokens/s" in follow.get_by_test_id("figures").inner_text()
    first_body, second_body = tab.chat_bodies()
    video = str(place["media"] / "main.mkv")
    assert first_body["messages"] == [first_message(video, QUESTION)]
    assert second_body["messages"][1:] == [{"role": "assistant", "content": text},
                                           {"role": "user", "content": FOLLOW_UP}]
    for body in (first_body, second_body):
        assert body["stream"] is True and body["temperature"] == 0 and "max_tokens" not in body
        assert body["sfllava"]["num_frames"] == 8
    # The API's answers to the same conversation (its own client, the page's options).
    messages = [first_message(video, QUESTION)]
    assert api_answer(server, messages, first_body["sfllava"]) == text
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": FOLLOW_UP}]
    assert api_answer(server, messages, first_body["sfllava"]) == follow_text
    with server.http() as h:  # the page's own body, replayed
        r = h.post("/v1/chat/completions", json={**second_body, "stream": False})
        assert r.json()["choices"][0]["message"]["content"] == follow_text
    # New chat: the messages go, the video stays and is not encoded again.
    tab.get("num-frames").fill("8")
    tab.get("new-chat").click()
    sync_api.expect(tab.get("assistant-message")).to_have_count(0)
    sync_api.expect(tab.get("user-message")).to_have_count(0)
    again = tab.ask(QUESTION)
    assert again.get_by_test_id("figures").get_attribute("data-cache") in ("held", "hit")
    assert again.get_by_test_id("assistant-text").text_content() == text


def test_errors_show_the_servers_message_and_the_page_goes_on(tab, server, place):
    bad = str(place["media"] / "notes.mp4")
    with server.http() as h:
        r = h.post("/v1/chat/completions", json={"messages": [first_message(bad, QUESTION)]})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    tab.choose("notes.mp4")
    sync_api.expect(tab.get("contact-sheet")).to_have_attribute("data-state", "error")
    sync_api.expect(tab.get("error")).to_have_text(message)
    answer = tab.ask(QUESTION, state="error")
    sync_api.expect(tab.get("error")).to_have_text(message)
    assert answer.get_by_test_id("assistant-text").text_content() == ""
    # A context overflow: a question longer than the tiny model's context (32768 tokens).
    long_question = "word " * 40000
    with pytest.raises(openai.BadRequestError) as e:
        api_answer(server, [first_message(str(place["media"] / "main.mkv"), long_question)], {})
    assert e.value.code == "context_length_exceeded"
    tab.choose("main.mkv")
    tab.sheet()
    tab.ask(long_question, state="error")
    sync_api.expect(tab.get("error")).to_have_text(e.value.body["message"])
    assert tab.ask(QUESTION).get_by_test_id("assistant-text").text_content()
    sync_api.expect(tab.get("error")).to_be_hidden()


def test_an_upload_is_sent_as_a_data_url(tab, server, place, tmp_path):
    tab.upload(place["media"] / "clips" / "short.mkv")
    answer = tab.ask(QUESTION)
    body = tab.chat_bodies()[-1]
    url = body["messages"][0]["content"][0]["video_url"]["url"]
    assert url.startswith("data:video/") and ";base64," in url
    assert api_answer(server, body["messages"], body["sfllava"]) == \
        answer.get_by_test_id("assistant-text").text_content()
    big = tmp_path / "big.mkv"  # past --max-upload-mb 1: the server's 413 message
    big.write_bytes(os.urandom(3 << 20))
    tab.upload(big)
    tab.ask(QUESTION, state="error")
    sync_api.expect(tab.get("error")).to_contain_text("--max-upload-mb")


def test_the_key_and_stop(browser, keyed, place):
    t = Tab(browser, keyed.url)
    try:
        sync_api.expect(t.get("api-key")).to_be_visible()
        t.get("api-key").fill("wrong")
        t.get("api-key").press("Enter")
        with keyed.http("wrong") as h:
            message = h.get("/v1/models").json()["error"]["message"]
        sync_api.expect(t.get("error")).to_have_text(message)
        keyless = len(t.requests)
        t.get("api-key").fill(KEY)
        t.get("api-key").press("Enter")
        sync_api.expect(t.get("video-item")).to_have_count(len(LISTED))
        sync_api.expect(t.get("api-key")).to_be_hidden()
        assert t.page.evaluate("sessionStorage.getItem('sfllava-api-key')") == KEY
        t.choose("main.mkv")
        answer = t.ask("Talk.", state="streaming")
        sync_api.expect(answer.get_by_test_id("assistant-text")).not_to_have_text("")
        t.get("stop").click()
        sync_api.expect(answer).to_have_attribute("data-state", "done")
        assert all(r.headers.get("authorization") == f"Bearer {KEY}"
                   for r in t.requests[keyless:] if "/v1/" in r.url)
        with keyed.http(KEY) as h:  # the server dropped the sequence
            status = wait_until(lambda: (s := h.get("/v1/sfllava/status").json())["running"] == 0
                                and s["recent"] and s)
        assert status["recent"][-1]["state"] == "cancelled"
        assert status["recent"][-1]["tokens"] < 20000
        # The key is this tab's: another tab asks again.
        other = Tab(browser, keyed.url)
        try:
            sync_api.expect(other.get("api-key")).to_be_visible()
        finally:
            other.close()
    finally:
        t.close()


def test_the_page_fetches_nothing_from_elsewhere(tab, server):
    tab.choose("main.mkv")
    tab.sheet()
    tab.ask(QUESTION)
    origin = server.url
    urls = [r.url for r in tab.requests]
    assert any(u == origin + "/" for u in urls) and any(u.endswith("/page/page.js") for u in urls)
    elsewhere = [u for u in urls if not (u.startswith(origin + "/") or u.startswith(f"blob:{origin}/"))]
    assert not elsewhere
