"""The library API of design.md §6.2 as a script uses it: Engine, Session, their options and errors.

Answers are held to the torch reference (tests/reference.py) on the sharpened tiny models of
conftest.py, whose greedy answer follows the visual tokens: a Session that sampled another
recipe, or kept another Session's state, would answer differently.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.command import REPO
from sfllava_mlx import Engine, UserError
from tests.conftest import FOLLOW_UP, LAYOUTS, LOGPROB_TOL, MAX_TOKENS, QUESTION


def answer(session, question=QUESTION, **ask):
    text = "".join(chunk.text for chunk in session.ask(question, max_tokens=MAX_TOKENS, **ask))
    assert text == session.last_turn.text
    return session.last_turn


def assert_same(a, b, what: str, tol: float = 0.0) -> None:
    assert a.tokens == b.tokens, f"{what}: {a.tokens} != {b.tokens}"
    diff = float(np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max()) if a.tokens else 0.0
    assert diff <= tol, f"{what}: max |logprob difference| {diff:.3g}"


@pytest.fixture(scope="module")
def engine(converted):
    return Engine(converted["oryx-vit"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_answer_equals_the_reference(layout, converted, reference_answers, videos):
    chat = Engine(converted[layout]).open(videos["main"], cache=False)
    turn = answer(chat)
    want = reference_answers[layout]
    assert want.tokens and turn.tokens == want.tokens
    assert np.abs(np.array(turn.logprobs) - np.array(want.logprobs)).max() <= LOGPROB_TOL
    record = chat.record()
    assert record["tokens"] == turn.tokens and record["logprobs"] == turn.logprobs
    assert record["visual_tokens"] == 224 and record["cache"] == "off"
    assert record["prompt_tokens"] == turn.prompt_tokens == chat.conversation.offset - len(turn.tokens)
    assert set(record["timings_s"]) >= {"frames", "vision", "prefill", "ttft", "generate"}


def test_sessions_own_their_options(engine, videos):
    """Sessions with other frame counts, fps and the time instruction on one Engine, used in
    interleaved order, each answer as the same Session alone would: nothing of one Session
    lives on the model or in another Session."""
    specs = {"native": dict(), "eight": dict(num_frames=8), "fps": dict(fps=2.0),
             "times": dict(num_frames=16, timestamps=True)}
    config_before = engine.model.config.to_dict()

    def conversation(session):
        return [answer(session, QUESTION), answer(session, FOLLOW_UP)]

    alone = {}
    for name, options in specs.items():
        alone[name] = conversation(Engine(engine.model, engine.tokenizer).open(
            videos["main"], cache=False, **options))
    sessions = {name: engine.open(videos["main"], cache=False, **options)
                for name, options in specs.items()}
    together = {name: [] for name in specs}
    for question in (QUESTION, FOLLOW_UP):
        for name in reversed(specs):  # another order than alone, each turn interleaved
            together[name].append(answer(sessions[name], question))
    for name in specs:
        for a, b in zip(together[name], alone[name]):
            assert_same(a, b, f"session {name}", tol=1e-5)
    assert engine.model.config.to_dict() == config_before
    # They really differ: the frames they saw, and so the prompt.
    assert len(sessions["eight"].clip.indices) == 8 and len(sessions["native"].clip.indices) == 128
    assert len(sessions["fps"].clip.indices) == 32  # 160 frames at 10 fps: 16 s at 2 a second
    # the time instruction (16 timestamps) is part of the first question's tokens
    assert together["times"][0].prompt_tokens > together["native"][0].prompt_tokens - 224 + 16 * 5
    assert len({tuple(together[name][0].tokens) for name in specs}) > 1


def test_a_picture_session_beside_a_video_session(engine, videos, tmp_path):
    import cv2

    picture = tmp_path / "picture.png"
    rng = np.random.default_rng(3)
    cv2.imwrite(str(picture), rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    alone = {"picture": answer(Engine(engine.model, engine.tokenizer).open(picture, cache=False)),
             "video": answer(Engine(engine.model, engine.tokenizer).open(
                 videos["main"], cache=False, num_frames=8))}
    pic = engine.open(picture, cache=False)
    vid = engine.open(videos["main"], cache=False, num_frames=8)
    assert (pic.media, vid.media) == ("image", "video")
    assert_same(answer(vid), alone["video"], "video beside a picture", 1e-5)
    assert_same(answer(pic), alone["picture"], "picture beside a video", 1e-5)
    assert pic.record()["recipe"] == "single" and vid.record()["recipe"] == "native"
    assert pic.record()["visual_tokens"] == engine.model.config.vision.num_patches


def test_reset_keeps_the_video_and_follow_ups_prefill_only_their_tokens(engine, videos):
    chat = engine.open(videos["main"], cache=False, num_frames=8)
    from sfllava_mlx.prompt import encode, next_turn

    first = answer(chat)
    follow = answer(chat, FOLLOW_UP)
    assert follow.prompt_tokens == len(encode(engine.tokenizer, next_turn(FOLLOW_UP)))
    assert first.prompt_tokens > chat.conversation.prefix_length()
    prefix = chat.conversation.prefix_length()
    chat.reset()
    assert chat.conversation.offset == prefix and chat.turns == []
    again = answer(chat)
    assert_same(again, first, "after reset", 1e-5)
    assert again.prompt_tokens == first.prompt_tokens - prefix  # the video was not prefilled again


# ---------------------------------------------------------------------------------------
# Errors a user can cause: UserError with one line, raised before any frame is decoded


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text, repr(text)
    return text


def test_user_errors_are_one_line_and_come_first(engine, videos, tmp_path, monkeypatch,
                                                 no_decoding):
    with pytest.raises(UserError) as e:
        engine.open(tmp_path / "nope.mp4")
    assert "not found" in one_line(e)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    with pytest.raises(UserError) as e:
        engine.plan(text)
    assert "not a video" in one_line(e) or "no frame" in one_line(e)
    with pytest.raises(UserError) as e:  # past the context: a rotating cache smaller than the video
        engine.open(videos["main"], max_kv_size=100)
    assert "--max-kv-size" in one_line(e)
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", "0.0001")
    with pytest.raises(UserError) as e:
        engine.plan(videos["main"])
    assert "needs about" in one_line(e) and "SFLLAVA_MEMORY_LIMIT_GB" in one_line(e)
    monkeypatch.delenv("SFLLAVA_MEMORY_LIMIT_GB")
    for bad, flag in ((dict(num_frames=0), "--num-frames"), (dict(recipe="fast"), "--recipe"),
                      (dict(fps=-1.0), "--fps"), (dict(seek="nearest"), "--seek"),
                      (dict(kv_bits=3), "--kv-bits")):
        with pytest.raises(UserError) as e:
            engine.plan(videos["main"], **bad)
        assert flag in one_line(e)
    with pytest.raises(TypeError, match="unknown option"):
        engine.open(videos["main"], frame_count=8)


def test_plan_is_the_memory_plan_of_the_open(engine, videos):
    small, big = engine.plan(videos["main"], num_frames=8), engine.plan(videos["main"])
    assert small.visual_tokens == 14 and big.visual_tokens == 224
    assert big.kv_cache >= small.kv_cache and big.weights == small.weights
    assert big.total > big.weights + big.kv_cache


# ---------------------------------------------------------------------------------------
# The README's example, as it is written there


def readme_example() -> str:
    text = (Path(REPO) / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(converted, videos, tmp_path, monkeypatch, capsys):
    import cv2

    code = readme_example()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    names = set(re.findall(r'"([^"]+\.(?:mp4|jpg))"', code))
    assert names, "the example names its video and picture files"
    for name in names:
        if name.endswith(".mp4") and "missing" not in name:
            Path(name).symlink_to(videos["main"])
        elif name.endswith(".jpg"):
            cv2.imwrite(name, np.full((40, 60, 3), 128, np.uint8))
    model = re.search(r'Engine\("([^"]+)"\)', code).group(1)
    code = code.replace(f'"{model}"', repr(str(converted["oryx-vit"])))
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "cache" in out and "error:" in out
