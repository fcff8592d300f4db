"""`sfllava chat`: the real program in a real terminal (tmux), and the script mode.

Terminal tests use a demo model whose greedy answer is "!" repeated up to --max-tokens
(tests/test_chat_support.demo_model(exclaim=True)): visible while it streams, and long
enough to be stopped with Ctrl-C.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.test_chat_support import (
    FAST,
    demo_model,
    demo_video,
    env,
    json_lines,
    run_inprocess,
    sfllava_cmd,
)

QUESTION = "What happens in this video?"
FOLLOW_UP = "What color is the car?"
STATUS = re.compile(r"ttft [\d.]+ s · (\d+) prompt tokens · (\d+) tokens, [\d.]+ tok/s"
                    r" · peak [\d.]+ GB · context (\d+)/(\d+)")


# ----------------------------------------------------------------------------------------
# In a terminal


class Terminal:
    """One program in a tmux pane of its own server: keys in, the screen out."""

    def __init__(self, command: str, environ: dict, width: int = 120, height: int = 40):
        self.socket = f"sfllava-test-{uuid.uuid4().hex[:8]}"
        self.env = environ
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  f"{command}; echo EXIT=$?; sleep 120")

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              env=self.env, check=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", "t")

    def send(self, *keys) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        """Poll the screen until predicate(screen) holds (timeouts only bound a hang)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"terminal never showed what was expected:\n{text}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, env=self.env)


def statuses(screen: str) -> list:
    return [tuple(map(int, m.groups())) for m in STATUS.finditer(screen)]


def at_prompt(screen: str) -> bool:
    lines = [ln for ln in screen.splitlines() if ln.strip()]
    return bool(lines) and lines[-1].strip() == "›"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    return {"model": demo_model(tmp, "exclaim", exclaim=True), "video": demo_video(tmp / "clip.mkv"),
            "other": demo_video(tmp / "other.mkv", 30, seed=3), "tmp": tmp}


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.slow
def test_terminal_chat(demo, tmp_path):
    environ = env(tmp_path / "xdg")
    base = " ".join(map(shlex.quote, sfllava_cmd() + [
        "chat", str(demo["video"]), "--model", str(demo["model"]), *FAST]))
    main = Terminal(f"{base} --max-tokens 1500", environ)
    # Started side by side (start-up is slow), with its own cache: the main session must
    # open the video cold, whichever process gets there first.
    quitter = Terminal(f"{base} --max-tokens 4", env(tmp_path / "xdg-quitter"))
    try:
        # The header: video name, duration, resolution; the model and its size.
        screen = main.wait_for(at_prompt)
        assert "clip.mkv · 0:04.00 · 64×48" in screen
        assert "exclaim" in screen and "parameters" in screen and "KB" in screen
        assert "8 frames (exact) → 14 visual tokens" in screen

        # An answer streams: text on screen before its status line; Ctrl-C stops it.
        main.send(QUESTION, "Enter")
        screen = main.wait_for(lambda s: "!" * 110 in s)
        assert statuses(screen) == []
        main.send("C-c")
        screen = main.wait_for(lambda s: len(statuses(s)) == 1 and at_prompt(s))
        assert "stopped · ttft" in screen
        (prefill1, tokens1, context1, limit) = statuses(screen)[0]
        assert 0 < tokens1 < 1500

        # A follow-up keeps the conversation: it prefills only its own tokens, and the
        # context grows by exactly that question and its answer.
        main.send(FOLLOW_UP, "Enter")
        screen = main.wait_for(lambda s: len(statuses(s)) == 2 and at_prompt(s), timeout=180)
        prefill2, tokens2, context2, _ = statuses(screen)[1]
        assert tokens2 == 1500  # ran to --max-tokens: not stopped
        assert context2 == context1 + prefill2 + tokens2
        assert prefill2 < context1 // 2

        # /reset: a new conversation about the same video, nothing re-encoded.
        main.send("/reset", "Enter")
        screen = main.wait_for(lambda s: "new conversation about clip.mkv" in s)
        # The first answer reports the video's prefill too: the cache holds just its tokens.
        assert context1 == prefill1 + tokens1
        prefix = int(re.search(r"video kept: (\d+) tokens in the cache", screen).group(1))
        assert 14 < prefix < prefill1  # the 14 visual tokens and the system prompt
        shown = main.screen().count("!" * 110)
        main.send(QUESTION, "Enter")
        main.wait_for(lambda s: s.count("!" * 110) > shown)
        main.send("C-c")
        screen = main.wait_for(lambda s: len(statuses(s)) == 3 and at_prompt(s))
        prefill3, tokens3, context3, _ = statuses(screen)[2]
        assert prefill3 == prefill1 - prefix and context3 == prefix + prefill3 + tokens3

        # /frames, /save, /video, then Ctrl-D leaves with status 0.
        main.send("/frames", "Enter")
        screen = main.wait_for(lambda s: "frames the model sees" in s and at_prompt(s))
        assert re.search(r"│\s+7 │\s+37 │\s+0:03.70 │ fast", screen)
        transcript = tmp_path / "chat.md"
        main.send(f"/save {transcript}", "Enter")
        main.wait_for(lambda s: f"to {transcript}" in s)
        text = transcript.read_text()
        assert text.count(f"**You:** {QUESTION}") == 2 and f"**You:** {FOLLOW_UP}" in text
        assert "*(stopped)*" in text and "*(new conversation)*" in text
        main.send(f"/video {demo['other']}", "Enter")
        screen = main.wait_for(lambda s: "other.mkv · 0:03.00 · 64×48" in s and at_prompt(s))
        main.send("C-d")
        main.wait_for(lambda s: "EXIT=0" in s)

        # Ctrl-C at the prompt leaves with status 0 too.
        quitter.wait_for(at_prompt)
        quitter.send("C-c")
        quitter.wait_for(lambda s: "EXIT=0" in s)
    finally:
        main.close()
        quitter.close()


# ----------------------------------------------------------------------------------------
# Scripts: standard input that is not a terminal


@pytest.fixture
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def test_script_mode_answers_each_line_in_one_conversation(converted, videos, xdg):
    model = converted["oryx-vit"]
    common = ["chat", videos["main"], "--model", model, *FAST, "--max-tokens", 6]
    code, out, err = run_inprocess(common + ["--json"], stdin=f"{QUESTION}\n\n{FOLLOW_UP}\n")
    assert code == 0, err
    first, second = json_lines(out)
    assert first["cache"] == "miss" and second["cache"] == "miss"
    assert first["visual_tokens"] == 14
    # The first turn prefilled the video; the follow-up only its own tokens (design.md §1.7).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    before = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    after = f"\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    again = f"<|im_end|>\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n"
    assert first["prompt_tokens"] == count(before) + first["visual_tokens"] + count(after)
    assert second["prompt_tokens"] == count(again)
    assert second["timings_s"]["vision"] == 0 and second["timings_s"]["frames"] == 0
    for rec in (first, second):
        assert set(rec) >= {"text", "tokens", "logprobs", "prompt_tokens", "visual_tokens",
                            "timings_s", "peak_memory_gb", "cache"}
        assert len(rec["tokens"]) == len(rec["logprobs"]) == 6

    # The same questions without --json: the same answers, each followed by a blank line
    # (a second run: the video now comes from the cache).
    code, out_plain, _ = run_inprocess(common, stdin=f"{QUESTION}\n{FOLLOW_UP}\n")
    assert code == 0
    assert out_plain == f"{first['text']}\n\n{second['text']}\n\n"

    # The first answer is generate's answer to the same question.
    code, out_gen, _ = run_inprocess(["generate", "--model", model, "--video", videos["main"],
                                      "--prompt", QUESTION, *FAST, "--max-tokens", 6, "--json"])
    assert json.loads(out_gen)["tokens"] == first["tokens"]

    # /reset in a script: the next question is a first question again.
    code, out, _ = run_inprocess(common + ["--json"], stdin=f"{QUESTION}\n/reset\n{QUESTION}\n")
    a, b = json_lines(out)
    assert a["cache"] == "hit" and b["tokens"] == a["tokens"] == first["tokens"]
    assert b["prompt_tokens"] == a["prompt_tokens"]


def test_context_overflow_is_refused_with_reset_offered(converted, videos, xdg, tmp_path):
    """A conversation about to pass the context is refused, not crashed, not cut."""
    model = tmp_path / "short-context"
    shutil.copytree(converted["oryx-vit"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 60  # prefix + 14 visual + one turn
    (model / "config.json").write_text(json.dumps(cfg))
    lines = f"{QUESTION}\n{FOLLOW_UP}\n/reset\n{QUESTION}\n"
    code, out, err = run_inprocess(["chat", videos["main"], "--model", model, *FAST,
                                    "--max-tokens", 6, "--json"], stdin=lines)
    assert code == 0, err
    records = json_lines(out)
    assert [("error" in r) for r in records] == [False, True, False]
    assert "/reset" in records[1]["error"] and "context" in records[1]["error"]
    assert "/reset" in err
    assert records[2]["tokens"] == records[0]["tokens"]


def test_missing_video_is_a_one_line_error(tmp_path, converted):
    code, out, err = run_inprocess(["chat", tmp_path / "nope.mp4", "--model", converted["oryx-vit"]])
    assert code == 2 and out == ""
    assert err.startswith("error: video not found") and len(err.strip().splitlines()) == 1
