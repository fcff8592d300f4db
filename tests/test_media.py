"""One opened video (issue 28): `sfllava generate` opens its video file at most twice, cold
and warm (its bytes for the fingerprint, one container for the rest), and the frames read
on the container that the other steps used first are the frames a fresh reader gives."""

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from sfllava_convert.tiny.command import run_env, sfllava_command
from sfllava_convert.tiny.videos import have_ffmpeg, make_ffmpeg_video
from tests.subtitle_support import mux, write_srt

LAYOUT = "oryx-vit"
MAX_OPENS = 2
needs_ffmpeg = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed (make setup)")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """An FFV1 MKV with a SubRip stream (the index from the packets; subtitles read through
    the container) and an H.264 MP4 (the index from the sample table), with the frames
    each was made from."""
    d = tmp_path_factory.mktemp("media")
    plain = d / "plain.mkv"
    frames = make_ffmpeg_video(plain, 60, width=48, height=40, fps=10, codec="ffv1")
    mkv = mux(plain, [write_srt(d / "events.srt")], d / "subtitled.mkv", "srt", ["eng"])
    mp4 = d / "clip.mp4"
    make_ffmpeg_video(mp4, 60, width=48, height=40, fps=10, codec="h264", gop=12)
    return {"mkv": (mkv, frames), "mp4": (mp4, None)}


class Opens:
    """Opens of one file in this process: Python's (the audit hook's `open` event covers
    open(), io.open and os.open) and FFmpeg's (av.open)."""

    watched = None  # the Opens counting now (audit hooks cannot be removed: one, switched)

    def __init__(self, path):
        self.path, self.count = os.path.realpath(path), 0

    def seen(self, path) -> None:
        try:
            if os.path.realpath(os.fsdecode(path)) == self.path:
                self.count += 1
        except (TypeError, ValueError):
            pass  # a file descriptor, not a path


def _audit(event, args):
    if event == "open" and Opens.watched is not None and args and args[0] is not None:
        Opens.watched.seen(args[0])


sys.addaudithook(_audit)


@pytest.fixture
def count_opens(monkeypatch):
    real_open = av.open

    def counted_av_open(file, *a, **k):
        if Opens.watched is not None and isinstance(file, (str, os.PathLike)):
            Opens.watched.seen(file)
        return real_open(file, *a, **k)

    monkeypatch.setattr(av, "open", counted_av_open)

    def run(path, fn):
        Opens.watched = Opens(path)
        try:
            fn()
            return Opens.watched.count
        finally:
            Opens.watched = None

    return run


@needs_ffmpeg
@pytest.mark.parametrize("name", ["mkv", "mp4"])
def test_generate_opens_its_video_at_most_twice(name, clips, converted, tmp_path, monkeypatch,
                                                capsys, count_opens):
    from sfllava_app.cli import main

    video = clips[name][0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # cold: an empty cache
    args = ["generate", "--model", str(converted[LAYOUT]), "--video", str(video), "--prompt",
            "What happens?", "--max-tokens", "2", "--json"]
    records = []
    for run in ("cold", "warm"):
        opens = count_opens(video, lambda: main(args))
        records.append(json.loads(capsys.readouterr().out))
        assert 1 <= opens <= MAX_OPENS, f"{run}: {opens} opens of {video.name}"
    assert [r["cache"] for r in records] == ["miss", "hit"]
    assert records[0]["tokens"] == records[1]["tokens"]
    if name == "mkv":  # the embedded stream was read through the same container
        assert records[0]["subtitles"]["source"] == "embedded"


@pytest.mark.slow
@needs_ffmpeg
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_generate_opens_its_video_at_most_twice_under_strace(clips, converted, tmp_path):
    """The same count as the kernel sees it (every openat of the process and its threads)."""
    video = clips["mkv"][0]
    args = ["generate", "--model", converted[LAYOUT], "--video", video, "--prompt", "Hi",
            "--max-tokens", "2", "--json"]
    for run in ("cold", "warm"):
        trace = tmp_path / f"{run}.trace"
        r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(trace),
                            *sfllava_command(args)], capture_output=True, text=True,
                           timeout=180, env=run_env(tmp_path))
        if r.returncode != 0 and not trace.exists():
            pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
        assert r.returncode == 0, r.stderr
        opens = sum(f'"{video}"' in line for line in trace.read_text().splitlines())
        assert 1 <= opens <= MAX_OPENS, f"{run}: {opens} openat of {video.name}"


@needs_ffmpeg
def test_frames_after_the_subtitles_are_the_videos_own(clips):
    """The container that read the subtitle stream is rewound for the frames: the frames
    are the ones the file was made from (FFV1: lossless), at design.md §1.1's indices."""
    from sfllava_mlx.frames import sample_positions
    from sfllava_mlx.media import Video

    path, made = clips["mkv"]
    with Video.open(path) as video:
        [stream] = video.text_streams
        assert video.subtitle_events(stream)
        with video.reader(num_frames=8, slow_every=4, hold_all=True) as reader:
            clip = reader.collect()
    want = sample_positions(len(made), 8, "midpoint")
    assert clip.indices == want
    assert all(np.array_equal(im, made[i]) for im, i in zip(clip.images, want))
