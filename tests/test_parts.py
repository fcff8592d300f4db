"""A part of a video (design.md §2.4): `--start` / `--end`, `start` / `end` in serve and the API,
and chat's `/part`.

The rule is implemented again here, independently: the frame times come from ffprobe's
frame list (or OpenCV's sequential read), the part keeps the frames with start <= t < end,
and the positions, the slow/fast streams and `--fps` (D = their count over their own
average frame rate) run over them alone, in the video's own numbering. `sfllava frames
--json`, the API, serve, chat and batch are held to it, and the answers to the torch
reference (tests/reference.py) fed that part's frames.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from sfllava_convert.tiny.command import run_env, sfllava_command
from sfllava_convert.tiny.videos import (
    have_ffmpeg,
    make_ffmpeg_video,
    make_ffv1_video,
    pattern_frames,
)
from sfllava_mlx import Engine, UserError
from sfllava_mlx import frames as F
from sfllava_mlx.options import Options, identity, requested
from tests.conftest import LOGPROB_TOL, MAX_TOKENS, QUESTION, json_lines, sfllava
from tests.videos import decode_all, ffprobe_frames

needs_ffmpeg = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed")
LAYOUT = "oryx-vit"
FOLLOW_UP = "What color is the car?"
PART = ("4.05", "0:12.5")  # of conftest's main video (160 frames at 10 fps): frames 41..124


# ----------------------------------------------------------------------------------------
# design.md §2.4, written again


def spec_part(times: list, start=None, end=None, num_frames: int = 128, fps=None,
              slow_every: int = 4) -> dict:
    """The positions of a part, from every frame's time (presentation order)."""
    keep = [i for i, t in enumerate(times)
            if (start is None or t >= start) and (end is None or t < end)]
    n = len(keep)
    t = num_frames
    if fps is not None:
        span = times[keep[-1]] - times[keep[0]]
        rate = (n - 1) / span  # the part's own average frame rate
        t = min(num_frames, max(1, math.ceil(n / rate * fps)))
    idx = [keep[(2 * i + 1) * n // (2 * t)] for i in range(t)]
    return {"index": idx, "timestamp": [times[i] for i in idx],
            "stream": ["slow" if i % slow_every == 0 else "fast" for i in range(t)]}


def probe_times(path) -> list:
    return [t for t, _ in ffprobe_frames(path)]


def opencv_times(path) -> tuple[list, float]:
    """(every frame's time, the frame count over the frame rate) as OpenCV reads the file."""
    cap = cv2.VideoCapture(str(path))
    times = []
    while cap.grab():
        times.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000)
    duration = len(times) / cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return times, duration


def time_instruction(duration: float, stamps: list) -> str:
    """design.md §2.2's line: D the whole video's, the sampled frames' own times."""
    joined = ",".join(f"{t:.2f}s" for t in stamps)
    return (f"The video lasts for {duration:.2f} seconds, and {len(stamps)} frames are uniformly "
            f"sampled from it. These frames are located at {joined}.Please answer the following "
            "questions related to this video.")


def frames_json(capsys, video, *flags) -> dict:
    from sfllava_app.cli import main

    assert main(["frames", str(video), "--json", *map(str, flags)]) == 0
    return json.loads(capsys.readouterr().out)


def assert_positions(doc: dict, want: dict) -> None:
    assert [f["index"] for f in doc["frames"]] == want["index"]
    assert [f["stream"] for f in doc["frames"]] == want["stream"]
    assert [f["timestamp"] for f in doc["frames"]] == pytest.approx(want["timestamp"], abs=1e-3)


# ----------------------------------------------------------------------------------------
# Time text


@pytest.mark.parametrize("text,seconds", [("75", 75.0), ("75.5", 75.5), ("1:15", 75.0),
                                          ("01:15.5", 75.5), ("0:01:15", 75.0),
                                          ("2:00:00", 7200.0), ("45:00", 2700.0), (" 0 ", 0.0),
                                          (12, 12.0), (2.5, 2.5)])
def test_time_forms(text, seconds):
    assert F.parse_time(text) == seconds
    assert F.parse_time(F.format_time(seconds)) == seconds  # what messages show reads back


@pytest.mark.parametrize("text,says", [("abc", "is not a time"), ("1:75", "is not a time"),
                                       ("1:5", "is not a time"), ("1:60:00", "is not a time"),
                                       ("", "is not a time"), ("1e3", "is not a time"),
                                       ("-3", "must not be negative"),
                                       ("-0:05", "must not be negative"),
                                       (-1.5, "must not be negative"), (True, "must be a time")])
def test_what_is_not_a_time(text, says):
    with pytest.raises(UserError) as e:
        F.parse_time(text, "--end")
    assert says in str(e.value) and str(e.value).startswith("--end")


def test_options_hold_the_part_in_seconds():
    a = Options(start="0:04", end="12.5")
    assert (a.start, a.end) == (4.0, 12.5) and a.part == F.Part(4.0, 12.5)
    held = lambda o: identity(requested(o), "visual", "prompt", "context")  # noqa: E731
    assert held(Options(start=4, end=12.5)) == held(a)
    assert held(Options()) != held(a)  # held conversations: by part
    assert held(Options(start=4)) != held(a)
    assert Options().part is None and Options(end="1:00").part == F.Part(None, 60.0)
    assert "--start" in Options(start=1).video_only_given()  # a picture ignores it, and says so
    for bad, says in [(dict(start=5, end=2), "--start 0:05 is not before --end 0:02"),
                      (dict(start=3, end=3), "is not before"), (dict(end="x"), "--end 'x'")]:
        with pytest.raises(UserError) as e:
            Options(**bad)
        assert says in str(e.value)


# ----------------------------------------------------------------------------------------
# Which frames: `sfllava frames --json` against the rule


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """FFV1 (exact timestamps at 10 fps), long-GOP H.264 in MP4 (index from the sample
    table) and in MKV with B-frames (index from the packets), a variable-frame-rate file."""
    d = tmp_path_factory.mktemp("parts")
    out = {"ffv1": d / "ffv1.mkv"}
    make_ffv1_video(out["ffv1"], 300, fps=10)  # 30 s
    if have_ffmpeg():
        out["h264"] = d / "gop.mp4"
        make_ffmpeg_video(out["h264"], 600, fps=25, gop=100)  # 24 s, a keyframe every 4 s
        out["h264-b"] = d / "gop-b.mkv"
        make_ffmpeg_video(out["h264-b"], 400, fps=25, gop=100, bframes=2)
        # 4 s at 25 fps, then 10 s at 5 fps
        times = [round(0.04 * i, 3) for i in range(100)] + [round(3.96 + 0.2 * j, 3)
                                                             for j in range(1, 51)]
        out["vfr"] = d / "vfr.mkv"
        make_ffmpeg_video(out["vfr"], 150, codec="h264", gop=30, bframes=2, timestamps=times)
    return out


def file_or_skip(files, name):
    if name not in files:
        pytest.skip("ffmpeg is not installed")
    return files[name]


@pytest.mark.parametrize("name,start,end,num_frames", [
    ("ffv1", "2", "5", 8),               # on frame times: 2.0 is in, 5.0 is out
    ("ffv1", "0:07.55", None, 128),      # to the end; fewer frames than positions: repeats
    ("ffv1", None, "12.55", 16),         # from the start
    ("ffv1", "0:00:20", "0:29.95", 32),  # [H:]M:SS
    ("h264", "9.01", "17.3", 32),        # mid-GOP on both sides
    ("h264", "0:21", None, 128),
    ("h264-b", "3.5", "11.02", 24),      # B-frames, packet index
    ("vfr", "2.5", "0:07.1", 16),        # variable frame rate: its times, not index / fps
])
def test_frames_of_a_part_follow_the_spec(capsys, files, name, start, end, num_frames):
    video = file_or_skip(files, name)
    times = probe_times(video)
    flags = ["--num-frames", num_frames]
    flags += ["--start", start] if start is not None else []
    flags += ["--end", end] if end is not None else []
    doc = frames_json(capsys, video, *flags)
    s = None if start is None else F.parse_time(start)
    e = None if end is None else F.parse_time(end)
    assert_positions(doc, spec_part(times, s, e, num_frames))
    assert doc["part"] == {"start": s, "end": e}
    # The video's own numbering: every index taken lies in the part, by its own time.
    assert all((s is None or times[i] >= s) and (e is None or times[i] < e)
               for i in (f["index"] for f in doc["frames"]))


@needs_ffmpeg
@pytest.mark.parametrize("name,start,end,fps", [("h264", "5.1", "19.7", 2.0),
                                                 ("ffv1", "3.05", "11.3", 0.7),
                                                 ("vfr", "0.5", "3.7", 3.0),
                                                 ("vfr", "3.1", "9.5", 2.0)])
def test_fps_runs_over_the_part(capsys, files, name, start, end, fps):
    """T = min(128, ceil(D x F)), D = the part's frame count over its own average rate."""
    video = files[name]
    times = probe_times(video)
    s, e = float(start), float(end)
    want = spec_part(times, s, e, 128, fps)
    keep = [t for t in times if s <= t < e]
    d = len(keep) / ((len(keep) - 1) / (keep[-1] - keep[0]))
    assert abs(d * fps - round(d * fps)) > 0.01  # no tie at the ceiling
    assert len(want["index"]) < 128
    doc = frames_json(capsys, video, "--start", start, "--end", end, "--fps", fps)
    assert_positions(doc, want)
    if name == "vfr":  # the part's own rate, not the whole file's, sets D here
        whole_rate = (len(times) - 1) / (times[-1] - times[0])
        assert math.ceil(len(keep) / whole_rate * fps) != len(want["index"])


def test_exact_frames_of_a_part(files):
    """The pixels are the frames at those indices (FFV1 is lossless)."""
    written = pattern_frames(300, 64, 48)  # what the fixture wrote
    clip = F.read_frames(files["ffv1"], num_frames=16, part=F.Part.of("11.25", "19"))
    want = spec_part([i / 10 for i in range(300)], 11.25, 19.0, 16)
    assert clip.indices == want["index"] and clip.exact
    for image, i in zip(clip.images, clip.indices):
        assert np.array_equal(image, written[i])
    assert clip.info.num_frames == 300  # the video's, not the part's


@needs_ffmpeg
def test_keyframe_mode_takes_the_keyframe_before_each_position(capsys, files):
    video = files["h264"]
    frames = ffprobe_frames(video)
    keyframes = [i for i, (_, key) in enumerate(frames) if key]
    doc = frames_json(capsys, video, "--start", "9.01", "--end", "17.3", "--num-frames", 16,
                      "--seek", "keyframe")
    exact = spec_part([t for t, _ in frames], 9.01, 17.3, 16)["index"]
    assert doc["exact"] is False
    assert [f["index"] for f in doc["frames"]] == [max(k for k in keyframes if k <= i)
                                                   for i in exact]


@needs_ffmpeg
def test_reading_a_part_seeks_into_it(tmp_path):
    """A part near the end of a long-GOP file decodes that part (from its keyframe), not the
    file up to it: the decoder's own count of frames out."""
    video = tmp_path / "long.mp4"
    make_ffmpeg_video(video, 3000, width=32, height=32, fps=25, gop=250)  # 2 minutes
    with F.iter_frames(video, num_frames=16, part=F.Part.of("1:40", "1:50")) as reader:
        indices = list(reader.indices)
        for _ in reader:
            pass
    assert indices[0] >= 2500 and indices[-1] < 2750
    floor = indices[-1] - 2500 + 1  # the keyframe at 2500 (1:40) up to the last frame wanted
    # The first frame (read when the file is opened) and what the frame threads hold back.
    slack = 1 + 2 * (os.cpu_count() or 1) + 8
    assert reader.seeks >= 1 and reader.decoded <= floor + slack, (reader.decoded, floor)


# ----------------------------------------------------------------------------------------
# Refusals: one line, exit 2, before any frame is decoded


REFUSED = [
    (["--start", "5", "--end", "0:02"], "--start 0:05 is not before --end 0:02"),
    (["--start", "3", "--end", "3"], "is not before"),
    (["--start", "-1"], "--start must not be negative"),
    (["--end", "-0:05"], "--end must not be negative"),  # not a flag to argparse
    (["--end=-0:05"], "--end must not be negative"),
    (["--start", "1:75"], "--start '1:75' is not a time"),
    (["--end", "soon"], "--end 'soon' is not a time"),
    (["--start", "30"], "the part 0:30- starts at or past the end of the video (0:30)"),
    (["--start", "0:31", "--end", "40"], "starts at or past the end of the video"),
    (["--start", "2.01", "--end", "2.05"], "the part 0:02.01-0:02.05 holds no frame"),
]


@pytest.mark.parametrize("flags,says", REFUSED)
def test_frames_refuses_bad_parts(capsys, files, flags, says):
    from sfllava_app.cli import main

    assert main(["frames", str(files["ffv1"]), "--json", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and says in err


@pytest.mark.slow
def test_generate_refuses_bad_parts(tmp_path, converted, files):
    for flags, says in (REFUSED[2], REFUSED[3], REFUSED[6], REFUSED[7], REFUSED[9]):
        r = sfllava(["generate", "--model", converted[LAYOUT], "--video", files["ffv1"],
                     "--prompt", QUESTION, "--json", *flags], tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr
    assert not list((tmp_path / "xdg-cache").rglob("visual.safetensors"))


@pytest.fixture(scope="module")
def engine(converted):
    return Engine(converted[LAYOUT])


def test_the_api_refuses_bad_parts_before_decoding(engine, files, no_decoding):
    for flags, says in REFUSED:
        options, given = {}, iter(flags)
        for f in given:  # "--end=-0:05" or "--start", "5"
            name, eq, value = f.partition("=")
            options[name.lstrip("-")] = value if eq else next(given)
        with pytest.raises(UserError) as e:
            engine.open(files["ffv1"], **options)
        assert says in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(UserError):
            engine.plan(files["ffv1"], fps=2.0, **options)


# ----------------------------------------------------------------------------------------
# Answers: the torch reference fed the part's frames


@pytest.fixture(scope="module")
def part_reference(sources, videos):
    """The reference's greedy answers about PART of the main video: plain, then QUESTION
    and FOLLOW_UP with the time instruction (D the whole video's)."""
    from tests.reference import Reference

    ref = Reference(sources[LAYOUT])
    times, duration = opencv_times(videos["main"])
    chosen = spec_part(times, *map(F.parse_time, PART))
    everything = decode_all(videos["main"])  # RGB, upright
    frames = [everything[i] for i in chosen["index"]]
    visual = ref.visual_tokens_from_pixels(ref.preprocess(frames))
    plain = ref.greedy(ref.prompt_embeddings(visual, QUESTION), MAX_TOKENS)
    timed_question = time_instruction(duration, chosen["timestamp"]) + "\n" + QUESTION
    timed = ref.chat(visual, [timed_question, FOLLOW_UP], MAX_TOKENS)
    whole = ref.answer(videos["main"], QUESTION, MAX_TOKENS)
    return {"plain": plain, "timed": timed, "whole": whole, "chosen": chosen, "ref": ref,
            "visual": visual, "timed_question": timed_question}


def assert_same(tokens, logprobs, want) -> None:
    assert tokens == want.tokens
    assert np.abs(np.array(logprobs) - np.array(want.logprobs)).max() <= LOGPROB_TOL


def test_api_answer_equals_the_reference(engine, videos, part_reference):
    session = engine.open(videos["main"], start=PART[0], end=PART[1], cache=False)
    assert session.clip.indices == part_reference["chosen"]["index"]
    for _ in session.ask(QUESTION, max_tokens=MAX_TOKENS):
        pass
    turn = session.last_turn
    assert_same(turn.tokens, turn.logprobs, part_reference["plain"])
    assert part_reference["plain"].tokens != part_reference["whole"].tokens  # the part matters
    record = session.record()
    assert record["part"] == {"start": 4.05, "end": 12.5} and record["visual_tokens"] == 224


def test_time_instruction_speaks_in_the_videos_time(engine, videos, part_reference):
    """--timestamps over a part: D = the whole video's 16 s, the frames' own times."""
    session = engine.open(videos["main"], start=PART[0], end=PART[1], timestamps=True,
                          cache=False)
    turns = []
    for question in (QUESTION, FOLLOW_UP):
        for _ in session.ask(question, max_tokens=MAX_TOKENS):
            pass
        turns.append(session.last_turn)
    for got, want in zip(turns, part_reference["timed"]):
        assert_same(got.tokens, got.logprobs, want)
    ref = part_reference["ref"]
    before, after = ref.prompt_pieces(part_reference["timed_question"])
    assert turns[0].prompt_tokens == len(before) + part_reference["visual"].shape[0] + len(after)
    assert "The video lasts for 16.00 seconds" in part_reference["timed_question"]


@pytest.mark.slow
def test_generate_answer_equals_the_reference(tmp_path, converted, videos, part_reference):
    r = sfllava(["generate", "--model", converted[LAYOUT], "--video", videos["main"], "--prompt",
                 QUESTION, "--max-tokens", MAX_TOKENS, "--json", "--start", PART[0], "--end",
                 PART[1], "--timestamps"], tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert_same(got["tokens"], got["logprobs"], part_reference["timed"][0])
    assert got["part"] == {"start": 4.05, "end": 12.5} and got["cache"] == "miss"


# ----------------------------------------------------------------------------------------
# The video cache keys on the part


def test_the_cache_keys_on_the_part(tmp_path, engine, videos):
    e = Engine(engine.model, engine.tokenizer, cache_dir=tmp_path / "cache")

    def state(**options):
        session = e.open(videos["main"], **options)
        for _ in session.ask(QUESTION, max_tokens=2):
            pass
        session.save()
        return session

    first = state(start=4.05, end=12.5)
    assert first.cache == "miss"
    again = state(start="0:04.05", end="12.5")  # the same part, written otherwise
    assert again.cache == "hit" and again.clip.indices == first.clip.indices
    assert again.clip.timestamps == first.clip.timestamps and again.clip.info.num_frames == 160
    assert again.record()["tokens"] == first.record()["tokens"]
    assert state().cache == "miss"  # the whole video is another entry
    assert state(start=4.05).cache == "miss"
    assert state(start=4.05, end=12.5, fps=2.0).cache == "miss"
    assert state(start=4.05, end=12.5, fps=2.0).cache == "hit"


# ----------------------------------------------------------------------------------------
# chat: /part and back


def test_chat_part_and_back_keeps_the_whole_videos_session(tmp_path, monkeypatch, converted,
                                                           videos, part_reference):
    """Piped chat: the part is encoded once, the whole video once; going back to either
    encodes nothing (the encoder is counted), and each answers as it would alone."""
    import sfllava_mlx.engine
    from tests.test_chat_support import run_inprocess

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    encodes = []
    real = sfllava_mlx.engine.encode_video_steps

    def counted(model, reader, *a, **k):
        encodes.append(len(reader.indices))
        return real(model, reader, *a, **k)

    monkeypatch.setattr(sfllava_mlx.engine, "encode_video_steps", counted)
    script = (f"{QUESTION}\n/part {PART[0]}-{PART[1]}\n{QUESTION}\n/part\n{FOLLOW_UP}\n"
              f"/part {PART[0]} - {PART[1]}\n{QUESTION}\n")
    code, out, err = run_inprocess(["chat", videos["main"], "--model", converted[LAYOUT],
                                    "--max-tokens", MAX_TOKENS, "--json"], script)
    assert code == 0, err
    whole, part, back, part_again = json_lines(out)
    assert len(encodes) == 2  # the whole video and the part, once each
    assert [r["part"] for r in (whole, part, back, part_again)] == [
        None, {"start": 4.05, "end": 12.5}, None, {"start": 4.05, "end": 12.5}]
    assert part["tokens"] == part_reference["plain"].tokens
    assert whole["tokens"] == part_reference["whole"].tokens
    # Back to the whole video: its conversation goes on, nothing encoded or prefilled again.
    for r in (back, part_again):
        assert r["cache"] == "hit" and r["timings_s"]["frames"] == r["timings_s"]["vision"] == 0
    code, out, _ = run_inprocess(["chat", videos["main"], "--model", converted[LAYOUT],
                                  "--max-tokens", MAX_TOKENS, "--json", "--no-cache"],
                                 f"{QUESTION}\n{FOLLOW_UP}\n")
    alone = json_lines(out)
    assert back["tokens"] == alone[1]["tokens"] and back["prompt_tokens"] == alone[1]["prompt_tokens"]
    # /part T0-T1 again: a new conversation about the part, the same first answer.
    assert part_again["tokens"] == part["tokens"]


def test_chat_refuses_a_bad_part_in_one_line(tmp_path, monkeypatch, converted, videos):
    from tests.test_chat_support import run_inprocess

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for text, says in [("4:00", "usage: /part T0-T1"), ("9-3", "is not before"),
                       ("x-3", "/part's start 'x' is not a time"), ("20-", "starts at or past")]:
        code, out, err = run_inprocess(["chat", videos["main"], "--model", converted[LAYOUT],
                                        "--max-tokens", 2, "--num-frames", 8],
                                       f"/part {text}\n{QUESTION}\n")
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err


def test_chat_header_help_and_transcript_show_the_part(tmp_path, engine, videos):
    from rich.console import Console

    from sfllava_app.chat.chat import Chat
    from sfllava_app.chat.ui import HELP, ChatUI, model_info
    from sfllava_app.cli import build_parser

    args = build_parser(["chat"]).parse_args(["chat", str(videos["main"]), "--model", "m",
                                              "--num-frames", "8", "--no-cache"])
    session = Engine(engine.model, engine.tokenizer).open(videos["main"], num_frames=8,
                                                         cache=False)
    chat = Chat(session.engine, args, session)
    assert chat.part("0:04-0:12") is False and chat.session.part == F.Part(4.0, 12.0)
    ui = ChatUI(Console(record=True, width=160))
    ui.header(chat.session, model_info(chat.engine))
    shown = ui.console.export_text()
    assert "part   0:04-0:12 (the video's own times) · 80 of the video's 160 frames" in shown
    assert "/part T0-T1" in HELP and "/part " in HELP
    assert chat.part("") is True and chat.session is session  # the kept whole-video Session
    text = chat.transcript.markdown("video", session.path, "m")
    assert "part 0:04-0:12)*" in text and "the whole video)*" in text
    # The whole video's Session and the last three parts' are kept; older parts are let go.
    for text in ("1-2", "2-3", "3-4"):
        assert chat.part(text) is False
    assert chat.part("0:04-0:12") is False  # the first part, dropped by now: opened again
    assert chat.part("3-4") is True and chat.part("") is True and chat.session is session


# ----------------------------------------------------------------------------------------
# serve


@pytest.fixture(scope="module")
def server(tmp_path_factory, converted, videos):
    from sfllava_convert.tiny.command import Server

    tmp = tmp_path_factory.mktemp("serve-parts")
    media = tmp / "media"
    media.mkdir()
    shutil.copy(videos["main"], media / "main.mkv")
    s = Server(["--model", converted[LAYOUT], "--media-dir", media], tmp)
    try:
        yield s.wait(), media / "main.mkv"
    finally:
        s.stop()


@pytest.mark.server
def test_serve_answers_about_a_part(server, part_reference):
    pytest.importorskip("openai")
    from sfllava_convert.tiny.command import first_message

    s, video = server
    client = s.client()
    messages = [first_message(f"file://{video}", QUESTION)]
    r = client.chat.completions.create(model="mlx-oryx-vit", messages=messages,
                                       max_tokens=MAX_TOKENS,
                                       extra_body={"sfllava": {"start": PART[0], "end": 12.5}})
    record = r.model_extra["sfllava"]
    assert_same(record["tokens"], record["logprobs"], part_reference["plain"])
    assert record["part"] == {"start": 4.05, "end": 12.5} and record["cache"] == "miss"
    # A follow-up about the same part continues the held conversation; about the whole
    # video it is another conversation (held conversations are keyed by the part).
    follow = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": FOLLOW_UP}]
    same = client.chat.completions.create(model="mlx-oryx-vit", messages=follow,
                                          max_tokens=MAX_TOKENS,
                                          extra_body={"sfllava": {"start": 4.05, "end": "0:12.5"}})
    assert same.model_extra["sfllava"]["cache"] == "held"
    whole = client.chat.completions.create(model="mlx-oryx-vit", messages=follow,
                                           max_tokens=MAX_TOKENS)
    assert whole.model_extra["sfllava"]["cache"] != "held"
    assert whole.model_extra["sfllava"]["part"] is None


@pytest.mark.server
def test_serve_refuses_bad_parts_with_400(server):
    from sfllava_convert.tiny.command import first_message

    s, video = server
    bad = [({"start": 5, "end": 2}, "sfllava.start 0:05 is not before sfllava.end 0:02"),
           ({"start": -1}, "sfllava.start must not be negative"),
           ({"end": "soon"}, "sfllava.end 'soon' is not a time"),
           ({"start": [1]}, "sfllava.start must be a time"),
           ({"start": "0:16"}, "starts at or past the end of the video"),
           ({"start": 4.01, "end": 4.05}, "holds no frame")]
    with s.http() as h:
        for options, says in bad:
            r = h.post("/v1/chat/completions", json={
                "model": "mlx-oryx-vit", "max_tokens": 2, "sfllava": options,
                "messages": [first_message(f"file://{video}", QUESTION)]})
            assert r.status_code == 400, (options, r.text)
            assert says in r.json()["error"]["message"]
        ok = h.post("/v1/chat/completions", json={
            "model": "mlx-oryx-vit", "max_tokens": 2, "sfllava": {"end": 8},
            "messages": [first_message(f"file://{video}", QUESTION)]})
        assert ok.status_code == 200 and ok.json()["sfllava"]["part"] == {"start": None,
                                                                          "end": 8.0}


# ----------------------------------------------------------------------------------------
# batch


@pytest.mark.slow
def test_batch_answers_the_part_of_every_video(tmp_path, converted, engine):
    lib = tmp_path / "lib"
    lib.mkdir()
    make_ffv1_video(lib / "long.mkv", 160, width=48, height=40, seed=5)  # 16 s
    make_ffv1_video(lib / "short.mkv", 40, width=48, height=40, seed=6)  # 4 s
    out = tmp_path / "out.jsonl"

    def batch(*flags):
        return subprocess.run(
            sfllava_command(["batch", lib, "--model", converted[LAYOUT], "--prompt", QUESTION,
                             "--max-tokens", MAX_TOKENS, "--out", out, *flags]),
            capture_output=True, text=True, timeout=300, env=run_env(tmp_path))

    r = batch("--start", "5", "--end", "0:10")
    assert r.returncode == 1, r.stderr  # the short video fails, the batch goes on
    lines = {Path(x["video"]).name: x for x in json_lines(out.read_text())}
    assert "starts at or past the end of the video" in lines["short.mkv"]["error"]
    long = lines["long.mkv"]
    assert long["error"] is None and long["part"] == {"start": 5.0, "end": 10.0}
    session = engine.open(lib / "long.mkv", start=5, end=10, cache=False)
    for _ in session.ask(QUESTION, max_tokens=MAX_TOKENS):
        pass
    assert long["tokens"] == session.last_turn.tokens
    assert "0 to answer" in batch("--start", "0:05", "--end", "10").stderr  # done: resumed
    r = batch("--end", "5")  # another part: other pairs
    assert "2 to answer" in r.stderr and r.returncode == 0, r.stderr
    records = json_lines(out.read_text())
    assert len(records) == 4 and all(x["error"] is None for x in records if x["options"]["end"] == 5)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
@pytest.mark.slow
def test_terminal_part_and_back(tmp_path, converted, videos):
    """In a terminal: the header shows the part; /part back is quick and says it kept."""
    import shlex

    from tests.test_chat import Terminal, at_prompt
    from tests.test_chat_support import env, sfllava_cmd

    command = " ".join(map(shlex.quote, sfllava_cmd() + [
        "chat", str(videos["main"]), "--model", str(converted[LAYOUT]), "--num-frames", "8",
        "--max-tokens", "2"]))
    term = Terminal(command, env(tmp_path / "xdg"), width=140)
    try:
        screen = term.wait_for(at_prompt, timeout=120)
        assert "part   " not in screen
        term.send("/part 4-0:12", "Enter")
        screen = term.wait_for(lambda s: "on part 0:04-0:12 in" in s and at_prompt(s))
        assert "part   0:04-0:12 (the video's own times) · 80 of the video's 160 frames" in screen
        term.send("/stats", "Enter")
        term.wait_for(lambda s: s.count("80 of the video's 160 frames") == 2 and at_prompt(s))
        term.send("/part", "Enter")
        term.wait_for(lambda s: "on the whole video in" in s and "(kept: nothing encoded again)"
                      in s and at_prompt(s))
        term.send("/part 20-", "Enter")
        term.wait_for(lambda s: "error: the part 0:20- starts at or past the end of the video"
                      in s and at_prompt(s))
        term.send("/help", "Enter")
        term.wait_for(lambda s: "/part T0-T1" in s and at_prompt(s))
        term.send("C-d")
        term.wait_for(lambda s: "EXIT=0" in s)
    finally:
        term.close()
