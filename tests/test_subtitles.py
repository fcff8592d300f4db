"""What is said (design.md §2.5): subtitles in the video (SubRip and ASS in MKV, mov_text in MP4)
and beside it (SRT, WebVTT, ASS), the lines the sampled frames select, the prompt, the
records, the errors, the cache.

The lines are held to the rule written out in tests/subtitle_support.py over ffprobe's frame
times and the events the test wrote (not read back with the library's parser); the answers
to the torch reference (tests/reference.py) given that prompt.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.videos import have_ffmpeg
from sfllava_mlx import Engine, UserError
from tests.conftest import LOGPROB_TOL, MAX_TOKENS, QUESTION, sfllava
from tests.subtitle_support import (
    EVENTS,
    HEADER,
    Line,
    block,
    frame_times,
    kept,
    mux,
    question_with,
    write_ass,
    write_srt,
    write_vtt,
)
from tests.test_chat_support import run_inprocess
from tests.videos import corrupt_frames

pytestmark = [pytest.mark.slow,  # end-to-end runs of the tiny model against the reference
              pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed (make setup)")]
LAYOUT = "oryx-vit"
# MP4's mov_text cannot hold overlapping events (ffmpeg's muxer cuts the earlier one
# short): the MP4 gets the events without the one inside another.
SEQUENTIAL = [e for e in EVENTS if e.plain != "Someone shouts"]
# Where each test video's subtitles are (the `source` of the records), and which events.
SOURCES = {"srt.mkv": "embedded", "ass.mkv": "embedded", "mov.mp4": "embedded",
           "side-srt/clip.mkv": "sidecar", "side-vtt/clip.mkv": "sidecar",
           "side-ass/clip.mkv": "sidecar"}


def events_of(name: str) -> list:
    return SEQUENTIAL if name.endswith(".mp4") else EVENTS


@pytest.fixture(scope="module")
def place(tmp_path_factory, videos) -> Path:
    """The main test video with EVENTS: muxed in as streams, and beside copies of it."""
    d = tmp_path_factory.mktemp("subtitles")
    main = videos["main"]
    files = {"srt": write_srt(d / "events.srt"), "vtt": write_vtt(d / "events.vtt"),
             "ass": write_ass(d / "events.ass")}
    mux(main, [files["srt"]], d / "srt.mkv", "srt", ["eng"])
    mux(main, [files["ass"]], d / "ass.mkv", "ass")
    mux(main, [write_srt(d / "sequential.srt", SEQUENTIAL)], d / "mov.mp4", "mov_text", ["eng"])
    for kind, f in files.items():
        (d / f"side-{kind}").mkdir()
        shutil.copy(main, d / f"side-{kind}" / "clip.mkv")
        shutil.copy(f, d / f"side-{kind}" / f"clip.{kind}")
    return d


@pytest.fixture(scope="module")
def engine(converted, tmp_path_factory):
    return Engine(converted[LAYOUT], cache_dir=tmp_path_factory.mktemp("subtitle-cache"))


@pytest.fixture(scope="module")
def expected(place) -> list:
    """The events the main video's 128 sampled frames select, by the rule written here."""
    lines = kept(EVENTS, frame_times(place / "srt.mkv"))
    plains = [e.plain for e in lines]
    # The fixture exercises the rule's edges: a start on a sampled frame is in, an event
    # holding only a frame that is not sampled, one after the last frame and a comment out.
    assert "A red car turns left" in plains and "Only an unsampled frame" not in plains
    assert "After the last frame" not in plains and "A comment, not a line" not in plains
    assert plains.index("The dog runs & the cat follows") < plains.index("Someone shouts")
    return lines


def records(lines) -> list:
    return [{"start": e.start_ms / 1000, "end": e.end_ms / 1000, "text": e.plain} for e in lines]


def frames_json(*argv) -> dict:
    code, out, err = run_inprocess(["frames", *argv, "--json"])
    assert code == 0, err
    return json.loads(out)


def answer(session, question=QUESTION):
    for _ in session.ask(question, max_tokens=MAX_TOKENS):
        pass
    return session.last_turn


def assert_same(got_tokens, got_logprobs, want) -> None:
    assert got_tokens == want.tokens
    assert np.abs(np.array(got_logprobs) - np.array(want.logprobs)).max() <= LOGPROB_TOL


# ----------------------------------------------------------------------------------------
# Which lines


@pytest.mark.parametrize("name", list(SOURCES))
def test_frames_show_the_lines_the_sampled_frames_select(place, expected, name):
    doc = frames_json(place / name)
    subs = doc["subtitles"]
    assert subs["source"] == SOURCES[name]
    lines = kept(events_of(name), frame_times(place / name))
    assert subs["lines"] == records(lines)
    # ... selected by the frames `frames` lists, the frames the model sees.
    assert [f["timestamp"] for f in doc["frames"]] == pytest.approx(frame_times(place / name),
                                                                     abs=1e-6)
    if SOURCES[name] == "embedded":
        assert subs["codec"] == {"srt.mkv": "subrip", "ass.mkv": "ass",
                                 "mov.mp4": "mov_text"}[name]
    else:
        assert Path(subs["path"]).name == f"clip.{name[5:8]}"  # side-srt/ holds clip.srt
    # The table says it too.
    code, out, _ = run_inprocess(["frames", place / name])
    shown = len([e for e in events_of(name) if not e.comment])
    assert code == 0 and f"{len(lines)} of {shown} lines selected" in out
    assert "A red car turns left" in out


def test_fewer_frames_select_fewer_lines(place):
    times = frame_times(place / "srt.mkv", 8)
    doc = frames_json(place / "srt.mkv", "--num-frames", 8)
    assert doc["subtitles"]["lines"] == records(kept(EVENTS, times))
    assert len(doc["subtitles"]["lines"]) < len(kept(EVENTS, frame_times(place / "srt.mkv")))


def test_a_replaced_frame_moves_the_selection(place, engine, tmp_path):
    """The lines follow the frames actually sampled: frame 3 (0.3 s) fails to decode and
    its neighbour frame 2 (0.2 s) takes its place, so the event on 0.3 s alone drops out
    and the one holding only 0.2 s comes in."""
    video = tmp_path / "clip.mkv"
    shutil.copy(place / "side-srt" / "clip.mkv", video)
    shutil.copy(place / "side-srt" / "clip.srt", tmp_path / "clip.srt")
    corrupt_frames(video, [3])
    doc = frames_json(video)
    times = [f["timestamp"] for f in doc["frames"]]
    assert 0.2 in times and 0.3 not in times
    lines = kept(EVENTS, times)
    plains = [e.plain for e in lines]
    assert "Only an unsampled frame" in plains and "A red car turns left" not in plains
    assert doc["subtitles"]["lines"] == records(lines)
    session = engine.open(video, cache=False)
    assert [e.text for e in session.subtitles.lines] == plains
    assert session.conversation.preamble == block(lines)


def test_the_embedded_stream_comes_before_a_sidecar(place, tmp_path, expected):
    shutil.copy(place / "srt.mkv", tmp_path / "film.mkv")
    write_srt(tmp_path / "film.srt", [Line(0, 20000, ["The sidecar's line"])])
    subs = frames_json(tmp_path / "film.mkv")["subtitles"]
    assert subs["source"] == "embedded" and subs["lines"] == records(expected)
    (tmp_path / "film.mkv").unlink()
    shutil.copy(place / "side-srt" / "clip.mkv", tmp_path / "film.mkv")  # no stream now
    assert frames_json(tmp_path / "film.mkv")["subtitles"]["lines"][0]["text"] == "The sidecar's line"


FRENCH = [Line(300, 4000, ["Une voiture rouge"]), Line(9000, 9500, ["Presque fini"])]


def test_subtitle_lang_picks_the_stream_and_the_sidecar(place, tmp_path, videos):
    fr = write_srt(tmp_path / "fr.srt", FRENCH)
    two = mux(videos["main"], [place / "events.srt", fr], tmp_path / "two.mkv", "srt",
              ["eng", "fre"])
    times = frame_times(two)
    first = frames_json(two)["subtitles"]  # the first stream without --subtitle-lang
    assert first["language"] == "eng" and first["lines"] == records(kept(EVENTS, times))
    for lang in ("fr", "fra", "fre"):  # ISO 639-1 and both 639-2 codes name French
        subs = frames_json(two, "--subtitle-lang", lang)["subtitles"]
        assert subs["language"] == "fre" and subs["lines"] == records(kept(FRENCH, times))
    code, out, err = run_inprocess(["frames", two, "--json", "--subtitle-lang", "de"])
    assert code == 0 and "subtitles" not in json.loads(out)
    assert "warning: no subtitles in 'de'" in err and "eng" in err

    side = tmp_path / "side"
    side.mkdir()
    shutil.copy(videos["main"], side / "clip.mkv")
    write_srt(side / "clip.en.srt")
    write_srt(side / "clip.fr.srt", FRENCH)
    subs = frames_json(side / "clip.mkv", "--subtitle-lang", "fr")["subtitles"]
    assert subs["path"].endswith("clip.fr.srt") and subs["lines"] == records(kept(FRENCH, times))
    assert frames_json(side / "clip.mkv", "--subtitle-lang", "eng")["subtitles"]["path"].endswith(
        "clip.en.srt")
    write_srt(side / "clip.srt", [Line(0, 20000, ["Untagged"])])  # untagged: the default
    assert frames_json(side / "clip.mkv")["subtitles"]["path"].endswith("clip.srt")


def test_off_and_a_file_given_by_name(place, tmp_path, expected):
    assert "subtitles" not in frames_json(place / "srt.mkv", "--subtitles", "off")
    other = write_vtt(tmp_path / "named.vtt", FRENCH)
    subs = frames_json(place / "srt.mkv", "--subtitles", other)["subtitles"]
    assert subs["source"] == "file" and subs["path"] == str(other)
    assert subs["lines"] == records(kept(FRENCH, frame_times(place / "srt.mkv")))


# ----------------------------------------------------------------------------------------
# The prompt and the answers


@pytest.fixture(scope="module")
def reference(references):
    return references[LAYOUT]


@pytest.mark.parametrize("name", ["srt.mkv", "ass.mkv", "mov.mp4", "side-vtt/clip.mkv"])
def test_answer_equals_the_reference_given_the_subtitles(place, engine, reference,
                                                         reference_answers, name):
    expected = kept(events_of(name), frame_times(place / name))
    session = engine.open(place / name, cache=False)
    # The first question's text, exactly: <image>\n{SUB}\n{question}.
    want_text = "\n" + question_with(expected, QUESTION) + "<|im_end|>\n<|im_start|>assistant\n"
    assert engine.tokenizer.decode(session.conversation.question_tokens(QUESTION)) == want_text
    turn = answer(session)
    visual = reference.visual_tokens(place / name)
    want = reference.greedy(reference.prompt_embeddings(visual, question_with(expected, QUESTION)),
                            MAX_TOKENS)
    assert_same(turn.tokens, turn.logprobs, want)
    before, after = reference.prompt_pieces(question_with(expected, QUESTION))
    assert turn.prompt_tokens == len(before) + visual.shape[0] + len(after)
    # The subtitles changed the answer: the prompt really carried them.
    assert want.tokens != reference_answers[LAYOUT].tokens
    assert session.record()["subtitles"]["lines"] == len(expected)


def test_generate_json_carries_the_subtitles_and_off_is_the_plain_answer(
        place, converted, tmp_path, expected, reference, reference_answers, cli_answers):
    def generate(video, *flags):
        r = sfllava(["generate", "--model", converted[LAYOUT], "--video", video, "--prompt",
                     QUESTION, "--max-tokens", MAX_TOKENS, "--json", *flags], tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    got = generate(place / "srt.mkv", "--no-cache")
    assert got["subtitles"] == {"source": "embedded", "stream": 1, "codec": "subrip",
                                "language": "eng", "lines": len(expected)}
    visual = reference.visual_tokens(place / "srt.mkv")
    want = reference.greedy(reference.prompt_embeddings(visual, question_with(expected, QUESTION)),
                            MAX_TOKENS)
    assert_same(got["tokens"], got["logprobs"], want)
    off = generate(place / "srt.mkv", "--subtitles", "off", "--no-cache")
    assert off["subtitles"] is None
    assert_same(off["tokens"], off["logprobs"], reference_answers[LAYOUT])
    assert cli_answers[LAYOUT]["subtitles"] is None  # a video with none: the plain prompt
    # Subtitles change only the question: the video cache serves the subtitled question,
    # with the same answer.
    assert generate(place / "srt.mkv")["cache"] == "miss"
    again = generate(place / "srt.mkv")
    assert again["cache"] == "hit" and again["tokens"] == got["tokens"]
    assert again["prompt_tokens"] < got["prompt_tokens"]  # the prefix came from the cache


def test_the_time_instruction_comes_before_the_subtitles(place, engine, expected):
    session = engine.open(place / "side-srt" / "clip.mkv", timestamps=True, cache=False)
    text = engine.tokenizer.decode(session.conversation.question_tokens(QUESTION))
    ti, sub_and_question = text[1:].split("\n", 1)
    assert ti.startswith("The video lasts for 16.00 seconds, and 128 frames")
    assert sub_and_question.startswith(question_with(expected, QUESTION))


def test_a_second_question_reads_no_subtitle_file_again(place, engine, expected, tmp_path):
    """The subtitles are read once, when the Session opens: its questions, a new
    conversation and its questions read them no more. A sidecar's reads are counted
    (Python's audit hook sees every open); a video's own stream is read by FFmpeg, out of
    the hook's sight, so the video is moved away once the Session is open."""
    shutil.copy(place / "side-ass" / "clip.mkv", tmp_path / "clip.mkv")
    sidecar = shutil.copy(place / "side-ass" / "clip.ass", tmp_path / "clip.ass")
    opened: list = []
    watching = [str(sidecar)]

    def hook(event, args):
        if event == "open" and watching and args and str(args[0]) == watching[0]:
            opened.append(args[0])

    sys.addaudithook(hook)  # hooks cannot be removed: this one watches one file, then none
    try:
        session = engine.open(tmp_path / "clip.mkv", cache=False)
        assert len(opened) == 1
        first = answer(session)
        answer(session, "And then?")
        session.reset()
        assert answer(session).tokens == first.tokens
        assert len(opened) == 1
    finally:
        watching.clear()

    video = shutil.copy(place / "ass.mkv", tmp_path / "own.mkv")
    session = engine.open(video, cache=False)
    Path(video).rename(tmp_path / "moved.mkv")  # nothing can read its stream again
    first = answer(session)
    answer(session, "And then?")
    session.reset()
    assert answer(session).tokens == first.tokens
    assert session.record()["subtitles"]["lines"] == len(expected)
    assert session.conversation.preamble == block(expected)


def test_a_cached_video_serves_its_subtitles_without_decoding(place, converted, tmp_path,
                                                              monkeypatch, expected):
    import sfllava_mlx.engine
    import sfllava_mlx.media

    engine = Engine(converted[LAYOUT], cache_dir=tmp_path)
    first = engine.open(place / "side-srt" / "clip.mkv")
    want = answer(first)
    first.save()

    def refuse(*a, **k):
        raise AssertionError("frames were read for a cached video")

    monkeypatch.setattr(sfllava_mlx.engine, "sampled_timestamps", refuse)
    monkeypatch.setattr(sfllava_mlx.media, "FrameReader", refuse)
    again = engine.open(place / "side-srt" / "clip.mkv")
    assert again.cache == "hit"
    turn = answer(again)
    assert turn.tokens == want.tokens and turn.prompt_tokens < want.prompt_tokens
    assert again.record()["subtitles"]["lines"] == len(expected)


# ----------------------------------------------------------------------------------------
# The memory plan and the context


def test_the_plan_and_the_context_count_the_subtitles(place, engine, expected):
    video = place / "srt.mkv"
    plain, subbed = engine.plan(video, subtitles="off"), engine.plan(video)
    extra = len(engine.tokenizer.encode(block(expected) + "\n", add_special_tokens=False))
    assert subbed.context_tokens - plain.context_tokens == extra > 20
    # A rotating KV cache with room for the video and a short prompt, not for the lines.
    limit = plain.visual_tokens + 16 + extra // 2
    engine.plan(video, subtitles="off", max_kv_size=limit)
    with pytest.raises(UserError) as e:
        engine.plan(video, max_kv_size=limit)
    assert "subtitles" in str(e.value) and "--max-kv-size" in str(e.value)


# ----------------------------------------------------------------------------------------
# Errors and warnings


def test_a_named_file_that_cannot_be_used_is_refused(place, converted, tmp_path):
    notes = tmp_path / "notes.srt"
    notes.write_text('{"not": "subtitles"}\n')
    empty = tmp_path / "empty.vtt"
    empty.write_text("WEBVTT\n\n")
    binary = tmp_path / "binary.ass"
    binary.write_bytes(bytes(range(256)) * 8)
    folder = tmp_path / "folder.srt"
    folder.mkdir()
    cases = {tmp_path / "missing.srt": "not found", notes: "not a subtitle file",
             empty: "no subtitle events", binary: "not a subtitle file", folder: "directory"}
    for path, words in cases.items():
        code, out, err = run_inprocess(["generate", "--model", converted[LAYOUT], "--video",
                                        place / "side-srt" / "clip.mkv", "--prompt", QUESTION,
                                        "--subtitles", path, "--json"])
        assert code == 2 and out == "", err
        assert err.startswith("error: ") and str(path) in err.splitlines()[0], err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_broken_sidecar_is_a_warning(place, converted, tmp_path, reference_answers):
    shutil.copy(place / "side-srt" / "clip.mkv", tmp_path / "clip.mkv")
    (tmp_path / "clip.srt").write_text("this is not a subtitle file\n")
    code, out, err = run_inprocess(["generate", "--model", converted[LAYOUT], "--video",
                                    tmp_path / "clip.mkv", "--prompt", QUESTION, "--max-tokens",
                                    MAX_TOKENS, "--json", "--no-cache"])
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(tmp_path / "clip.srt") in warning[0]
    got = json.loads(out)
    assert got["subtitles"] is None and got["tokens"] == reference_answers[LAYOUT].tokens


# ----------------------------------------------------------------------------------------
# The chat, batch and the server


def test_chat_says_where_the_subtitles_came_from_and_lists_them(place, converted, engine,
                                                                expected):
    import io

    from rich.console import Console

    from sfllava_app.chat.ui import ChatUI, model_info

    code, out, err = run_inprocess(["chat", place / "ass.mkv", "--model", converted[LAYOUT],
                                    "--max-tokens", MAX_TOKENS, "--json"],
                                   f"{QUESTION}\n/subs\n/reset\n{QUESTION}\n")
    assert code == 0, err
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 2 and turns[0]["tokens"] == turns[1]["tokens"]
    assert turns[0]["subtitles"]["source"] == "embedded"
    assert turns[0]["subtitles"]["lines"] == len(expected)
    assert f"{len(expected)} of {len(EVENTS) - 1} lines selected" in err
    for e in expected:
        assert e.plain in err
    # The terminal's header and /subs, rendered.
    session = engine.open(place / "ass.mkv", cache=False)
    console = Console(file=io.StringIO(), width=200, highlight=False)
    ui = ChatUI(console)
    ui.header(session, model_info(engine))
    ui.subtitles(session.subtitles)
    shown = console.file.getvalue()
    assert "embedded stream 1 (ass)" in shown and f"{len(expected)} of 6 lines selected" in shown
    assert "A red car turns left" in shown and "Only an unsampled frame" not in shown


def test_batch_lines_carry_the_subtitles(place, converted, tmp_path, expected, videos):
    broken = tmp_path / "broken"
    broken.mkdir()
    # Another video: batch answers a video's content once, whatever lies beside its copies.
    shutil.copy(videos["other"], broken / "clip.mkv")
    (broken / "clip.srt").write_text("not subtitles\n")
    out = tmp_path / "r.jsonl"
    r = sfllava(["batch", place / "srt.mkv", place / "side-vtt" / "clip.mkv", broken / "clip.mkv",
                 "--model", converted[LAYOUT], "--prompt", QUESTION, "--max-tokens", MAX_TOKENS,
                 "--out", out, "--no-cache"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["subtitles"]["source"] for x in lines[:2]] == ["embedded", "sidecar"]
    assert all(x["subtitles"]["lines"] == len(expected) for x in lines[:2])
    assert lines[0]["tokens"] == lines[1]["tokens"]  # the same frames and the same lines
    assert lines[2]["subtitles"] is None and lines[2]["error"] is None  # a warning, no more
    assert f"warning: {broken / 'clip.mkv'}: ignoring the subtitles" in r.stderr


@pytest.mark.server
def test_serve_takes_subtitles_per_request(place, converted, tmp_path, expected, reference):
    from sfllava_convert.tiny.command import Server

    outside = tmp_path / "outside.srt"
    write_srt(outside, FRENCH)
    inside = place / "side-vtt" / "named.srt"
    write_srt(inside, FRENCH)
    server = Server(["--model", converted[LAYOUT], "--media-dir", place, "--max-tokens",
                     MAX_TOKENS], tmp_path).wait()
    try:
        http = server.http()

        def ask(subtitles=None):
            body = {"messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": str(place / "side-vtt" / "clip.mkv")}},
                {"type": "text", "text": QUESTION}]}], "max_tokens": MAX_TOKENS}
            if subtitles is not None:
                body["sfllava"] = {"subtitles": subtitles}
            return http.post("/v1/chat/completions", json=body)

        auto = ask().json()["sfllava"]
        assert auto["subtitles"]["source"] == "sidecar" and auto["subtitles"]["lines"] == len(expected)
        visual = reference.visual_tokens(place / "side-vtt" / "clip.mkv")
        want = reference.greedy(reference.prompt_embeddings(visual, question_with(expected, QUESTION)),
                                MAX_TOKENS)
        assert auto["tokens"] == want.tokens
        assert ask("off").json()["sfllava"]["subtitles"] is None
        named = ask(str(inside)).json()["sfllava"]["subtitles"]
        assert named["source"] == "file" and named["path"] == str(inside)
        assert named["lines"] == len(kept(FRENCH, frame_times(place / "side-vtt" / "clip.mkv")))
        r = ask(str(outside))
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
        r = ask(str(place / "nope.srt"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "subtitles_not_found"
        r = ask(7)
        assert r.status_code == 400 and r.json()["error"]["param"] == "sfllava.subtitles"
        assert http.get("/health").json() == {"status": "ok"}  # it serves on
    finally:
        server.stop()


def test_the_header_constant_is_lmms_evals_wording():
    from sfllava_mlx.prompt import SUBTITLES_HEADER, subtitle_block

    assert SUBTITLES_HEADER == HEADER
    assert subtitle_block(["a", "b"]) == HEADER + "a\nb" and subtitle_block([]) == ""


def test_subtitle_options_are_checked(engine, place):
    for bad in (dict(subtitles=""), dict(subtitle_lang=" "),
                dict(speech_model=3)):
        with pytest.raises(UserError) as e:
            engine.plan(place / "srt.mkv", **bad)
        assert "--subtitle" in str(e.value) or "--speech-model" in str(e.value)


def test_a_part_selects_the_lines_of_its_own_frames(place, engine):
    """--start/--end with subtitles (design.md §2.4, §2.5): the frames sampled inside the part
    select the lines, by the rule written out here over ffprobe's frame times."""
    from tests.videos import ffprobe_frames

    start, end = 4.0, 10.0
    times = [t for t, _ in ffprobe_frames(place / "srt.mkv")]
    inside = [t for t in times if start <= t < end]  # the part's frames, then §2.1 over them
    n = len(inside)
    sampled = [inside[(2 * i + 1) * n // (2 * 128)] for i in range(128)]
    want = kept(EVENTS, sampled)
    assert want and want != kept(EVENTS, frame_times(place / "srt.mkv"))
    doc = frames_json(place / "srt.mkv", "--start", "0:04", "--end", "10")
    assert doc["subtitles"]["lines"] == records(want)
    session = engine.open(place / "srt.mkv", start="0:04", end=10, cache=False)
    assert [e.text for e in session.subtitles.lines] == [e.plain for e in want]
    assert session.conversation.preamble == block(want)


def test_batch_resumes_per_subtitle_request(place, converted, tmp_path):
    """The same library again with other --subtitles is not "already answered": the lines'
    resume key holds the subtitles as read (the resolved options)."""
    out = tmp_path / "r.jsonl"
    base = ["batch", place / "srt.mkv", "--model", converted[LAYOUT], "--prompt", QUESTION,
            "--max-tokens", 2, "--out", out, "--no-cache"]
    assert sfllava(base, tmp_path).returncode == 0
    again = sfllava(base, tmp_path)
    assert "1 already in" in again.stderr
    off = sfllava(base + ["--subtitles", "off"], tmp_path)
    assert off.returncode == 0 and "0 already in" in off.stderr, off.stderr
    lines = {x["options"]["subtitles"]: x for x in map(json.loads, out.read_text().splitlines())}
    stream = f"stream {lines[next(k for k in lines if k)]['subtitles']['stream']}"
    assert set(lines) == {stream, None}  # the embedded stream read, or none
    assert lines[stream]["subtitles"]["lines"] > 0
    assert lines[None]["subtitles"] is None
