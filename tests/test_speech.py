"""`--subtitles speech` (design.md §2.5): the audio track decoded to 16 kHz mono float32 and
transcribed on device by mlx-whisper, on the video's clock, cached with the video.

Whisper's weights cannot be downloaded here, so the tests write a tiny random-weight Whisper
in mlx-whisper's directory layout: what it says is noise, but the whole path runs — the audio
(held sample by sample to ffmpeg's own decode), the model, the segments (held to mlx-whisper
run directly on ffmpeg's samples, moved by the track's start as ffprobe reports it), the
selection, the prompt (held to the torch reference), the cache and the errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from sfllava_convert.tiny.videos import have_ffmpeg
from sfllava_convert.tiny.whisper import write_tiny_whisper
from sfllava_mlx import Engine, UserError
from tests.conftest import MAX_TOKENS, QUESTION
from tests.subtitle_support import (
    HEADER,
    add_audio,
    audio_start,
    ffmpeg_audio,
    frame_times,
    kept_seconds,
)
from tests.test_chat_support import run_inprocess

pytestmark = [
    pytest.mark.slow,  # Whisper and the tiny model, end to end
    pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed (make setup)"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("mlx_whisper") is None,
                       reason="mlx-whisper is not installed (pip install '.[speech]')"),
]
LAYOUT = "oryx-vit"
DELAY = 1.0  # the audio starts a second into the video


@pytest.fixture(scope="module")
def whisper(tmp_path_factory) -> Path:
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


@pytest.fixture(scope="module")
def talking(tmp_path_factory, videos) -> dict:
    """The main test video with beeps: 48 kHz stereo PCM starting DELAY s in (what the
    segments are held to), and AAC at 44.1 kHz from the start (a lossy decoder, resampled)."""
    d = tmp_path_factory.mktemp("talking")
    return {"pcm": add_audio(videos["main"], d / "pcm.mkv", delay=DELAY),
            "aac": add_audio(videos["main"], d / "aac.mkv", codec="aac", rate=44100)}


def same_segments(got, want, tol: float = 1e-6) -> None:
    assert [g[2] for g in got] == [w[2] for w in want]
    assert np.allclose([g[:2] for g in got], [w[:2] for w in want], atol=tol, rtol=0)


def whisper_directly(whisper: Path, video: Path) -> list:
    """mlx-whisper run on ffmpeg's samples as its own README runs it (fp16 off on this CPU,
    sampling from seed 0), its segments moved by ffprobe's start of the track."""
    import mlx.core as mx
    import mlx_whisper
    from mlx_whisper.transcribe import ModelHolder

    ModelHolder.get_model(str(whisper), mx.float32)  # loaded before the seed, as the app does
    mx.random.seed(0)
    result = mlx_whisper.transcribe(ffmpeg_audio(video), path_or_hf_repo=str(whisper), fp16=False)
    shift = audio_start(video)
    return [(s["start"] + shift, s["end"] + shift, s["text"].strip()) for s in result["segments"]]


@pytest.fixture(scope="module")
def segments(whisper, talking) -> list:
    out = whisper_directly(whisper, talking["pcm"])
    assert any(text for _, _, text in out), "the tiny model said nothing: pick another seed"
    return out


# ----------------------------------------------------------------------------------------
# The audio


@pytest.mark.parametrize("track", ["pcm", "aac"])
def test_the_audio_is_ffmpegs_decode_sample_by_sample(talking, track):
    from sfllava_mlx.subtitles.speech import decode_audio

    audio = decode_audio(talking[track])
    want = ffmpeg_audio(talking[track])
    assert audio.samples.dtype == np.float32 and audio.samples.shape == want.shape
    if track == "pcm":  # integer samples: the same conversion gives the same floats
        assert np.array_equal(audio.samples, want)
    else:  # a floating-point decoder (PyAV's FFmpeg and Debian's may round differently)
        assert np.abs(audio.samples - want).max() <= 1e-6
    assert audio.offset == pytest.approx(audio_start(talking[track]), abs=1e-6)
    assert audio.offset == pytest.approx(DELAY if track == "pcm" else 0.0, abs=1e-3)


# ----------------------------------------------------------------------------------------
# The segments and the prompt


def test_segments_are_whispers_on_the_video_clock(whisper, talking, segments, tmp_path):
    from sfllava_mlx.media import Video
    from sfllava_mlx.subtitles import resolve, transcribe

    with Video.open(str(talking["pcm"])) as video:
        found = resolve(video, "speech", speech_model=str(whisper))
        assert found.track.events is None  # nothing cached: transcribed on open
        progress = []
        track = transcribe(found.track, video,
                           progress=lambda done, total: progress.append((done, total)))
    want = [s for s in sorted(segments, key=lambda s: (s[0], s[1])) if s[2] and s[1] > s[0]]
    same_segments([(e.start, e.end, e.text) for e in track.events], want)
    assert all(e.start >= DELAY for e in track.events)
    # Progress in seconds of audio, up to its whole length.
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1] == 12


def test_generate_with_speech_equals_the_reference_and_a_rerun_transcribes_nothing(
        whisper, talking, segments, converted, references, tmp_path):
    video = talking["pcm"]
    argv = ["generate", "--model", converted[LAYOUT], "--video", video, "--prompt", QUESTION,
            "--max-tokens", MAX_TOKENS, "--json", "--subtitles", "speech", "--speech-model",
            whisper]
    env = run_env(tmp_path)
    first = subprocess.run(sfllava_command(argv), capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr
    got = json.loads(first.stdout)
    lines = kept_seconds(segments, frame_times(video))
    assert lines, "no segment falls on a sampled frame"
    assert got["subtitles"] == {"source": "speech", "model": str(whisper),
                                "language": got["subtitles"]["language"], "lines": len(lines)}
    ref = references[LAYOUT]
    visual = ref.visual_tokens(video)
    question = HEADER + "\n".join(text for _, _, text in lines) + "\n" + QUESTION
    want = ref.greedy(ref.prompt_embeddings(visual, question), MAX_TOKENS)
    assert got["tokens"] == want.tokens
    assert np.abs(np.array(got["logprobs"]) - np.array(want.logprobs)).max() <= 5e-4
    before, after = ref.prompt_pieces(question)  # the prompt carried the lines
    assert got["prompt_tokens"] == len(before) + visual.shape[0] + len(after)
    stored = list((tmp_path / "xdg-cache" / "sfllava" / "speech-v1").glob("*.json"))
    assert len(stored) == 1

    # Again, with an mlx-whisper that cannot transcribe: the cached segments serve.
    fake = tmp_path / "fake"
    (fake / "mlx_whisper").mkdir(parents=True)
    (fake / "mlx_whisper" / "__init__.py").write_text(
        "raise ImportError('the test forbids transcribing again')\n")
    again = subprocess.run(sfllava_command(argv), capture_output=True, text=True,
                           env={**env, "PYTHONPATH": f"{fake}{os.pathsep}{env['PYTHONPATH']}"},
                           cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert rerun["tokens"] == got["tokens"] and rerun["subtitles"] == got["subtitles"]
    assert rerun["cache"] == "hit"


def test_a_reopen_and_a_second_question_transcribe_nothing(whisper, talking, converted,
                                                           tmp_path, monkeypatch):
    import sfllava_mlx.subtitles.speech as speech

    calls = []
    real = speech.transcribe
    monkeypatch.setattr(speech, "transcribe", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(converted[LAYOUT], cache_dir=tmp_path)
    opts = dict(subtitles="speech", speech_model=str(whisper), num_frames=16)
    session = engine.open(talking["pcm"], **opts)
    for q in (QUESTION, "And then?"):
        for _ in session.ask(q, max_tokens=2):
            pass
    assert len(calls) == 1
    lines = session.subtitles
    again = engine.open(talking["pcm"], **opts)
    assert len(calls) == 1 and again.subtitles.lines == lines.lines
    # The plan of a cached transcript counts its lines before anything is decoded.
    assert engine.plan(talking["pcm"], **opts).context_tokens > engine.plan(
        talking["pcm"], num_frames=16, subtitles="off").context_tokens
    # Without the cache, every open transcribes.
    engine.open(talking["pcm"], cache=False, **opts)
    assert len(calls) == 2


def test_cache_ls_lists_the_transcript_and_clear_removes_it(whisper, talking, segments,
                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, _, err = run_inprocess(["frames", talking["pcm"], "--json", "--subtitles", "speech",
                                  "--speech-model", whisper])
    assert code == 0, err
    code, out, err = run_inprocess(["cache", "ls", "--json"])
    assert code == 0, err
    [t] = json.loads(out)["transcripts"]
    assert (Path(t["video"]).resolve(), t["model"]) == (Path(talking["pcm"]).resolve(),
                                                        str(whisper))
    assert t["segments"] == len(segments) and t["bytes"] > 0
    code, out, _ = run_inprocess(["cache", "ls"])
    assert code == 0 and "transcripts" in out and Path(talking["pcm"]).name in out
    code, out, _ = run_inprocess(["cache", "clear"])
    assert code == 0 and "1 transcript" in out
    assert json.loads(run_inprocess(["cache", "ls", "--json"])[1])["transcripts"] == []


def test_frames_lists_what_was_said(whisper, talking, segments, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, out, err = run_inprocess(["frames", talking["pcm"], "--json", "--subtitles", "speech",
                                    "--speech-model", whisper])
    assert code == 0, err
    subs = json.loads(out)["subtitles"]
    lines = kept_seconds(segments, frame_times(talking["pcm"]))
    assert subs["source"] == "speech"
    same_segments([(x["start"], x["end"], x["text"]) for x in subs["lines"]], lines, tol=1e-3)


# ----------------------------------------------------------------------------------------
# Errors: one line, exit 2, before anything is decoded


def generate_error(converted, video, *flags) -> str:
    code, out, err = run_inprocess(["generate", "--model", converted[LAYOUT], "--video", video,
                                    "--prompt", QUESTION, "--json", "--subtitles", "speech",
                                    *flags])
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    return err


def test_speech_without_an_audio_track(converted, videos, whisper):
    err = generate_error(converted, videos["main"], "--speech-model", whisper)
    assert "has no audio track" in err and str(videos["main"]) in err


def test_speech_without_mlx_whisper_says_how_to_install_it(converted, talking, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx_whisper", None)  # as if it were not installed
    err = generate_error(converted, talking["pcm"])
    assert "mlx-whisper" in err and "pip install 'sfllava-mlx[speech]'" in err


def test_a_speech_model_that_is_not_one(converted, talking, tmp_path):
    assert "no such directory" in generate_error(converted, talking["pcm"], "--speech-model",
                                                 tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    err = generate_error(converted, talking["pcm"], "--speech-model", tmp_path / "empty")
    assert "not a Whisper model directory" in err


def test_the_api_raises_the_same_errors(converted, videos):
    engine = Engine(converted[LAYOUT])
    with pytest.raises(UserError, match="no audio track"):
        engine.plan(videos["main"], subtitles="speech")


def test_a_terminal_gets_a_progress_bar_and_a_pipe_none():
    import io

    from sfllava_app.subtitles import SPEECH_LABEL, speech_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    with speech_progress(screen) as progress:
        progress("frames", 1, 8)  # other stages draw nothing
        progress("speech", 30, 60)
    assert SPEECH_LABEL in screen.getvalue()
    with speech_progress(io.StringIO()) as progress:
        assert progress is None


def test_the_default_model_comes_from_the_hub_only_when_speech_is_asked(converted, talking,
                                                                        monkeypatch, tmp_path):
    """Without the network (here: the hub offline) the default model cannot come: one line
    naming it, before the audio is decoded; asking for no speech never reaches the hub."""
    import sfllava_mlx.subtitles.speech as speech

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(speech, "decode_audio", lambda *a: pytest.fail("audio decoded first"))
    engine = Engine(converted[LAYOUT], cache_dir=tmp_path)
    with pytest.raises(UserError) as e:
        engine.open(talking["pcm"], subtitles="speech", num_frames=8)
    assert speech.DEFAULT_SPEECH_MODEL in str(e.value) and "\n" not in str(e.value)
    calls = []
    monkeypatch.setattr(speech, "download", lambda *a: calls.append(a))
    engine.open(talking["pcm"], num_frames=8)  # auto: no subtitles here, no hub
    assert not calls
