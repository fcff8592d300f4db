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

    def run(path, fn, *args, **kwargs):
        """(the opens of `path` while fn(*args, **kwargs) runs, what it returned)"""
        Opens.watched = Opens(path)
        try:
            result = fn(*args, **kwargs)
            return Opens.watched.count, result
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
        opens, _ = count_opens(video, main, args)
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


# ----------------------------------------------------------------------------------------
# The other front ends: each use of a video opens it once (its bytes, one container)


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def fds_of(path) -> list:
    """This process's file descriptors open on `path` (Linux's /proc)."""
    real, fds = os.path.realpath(path), "/proc/self/fd"
    return [fd for fd in os.listdir(fds) if os.path.realpath(os.path.join(fds, fd)) == real]


@needs_ffmpeg
def test_chat_opens_its_video_once_per_use(clips, converted, cold_cache, count_opens):
    """`sfllava chat`'s opening, cold and warm, then a `/part`: a use of its own."""
    from tests.test_chat_support import json_lines, run_inprocess

    video = clips["mkv"][0]
    common = ["chat", video, "--model", converted[LAYOUT], "--max-tokens", 2, "--json"]
    caches = []
    for run, lines, uses in (("cold", "Hi\n", 1), ("warm", "Hi\n", 1),
                             ("with /part", "Hi\n/part 1-3\nHi\n", 2)):
        opens, (code, out, err) = count_opens(video, run_inprocess, common, stdin=lines)
        assert code == 0, err
        assert 1 <= opens <= uses * MAX_OPENS, f"{run}: {opens} opens of {video.name}"
        caches.append(json_lines(out)[0]["cache"])
    assert caches == ["miss", "hit", "hit"]


@pytest.fixture
def server_app(clips, converted, tmp_path, cold_cache):
    """`sfllava serve`'s app and worker in this process, its media dir holding the clip."""
    from starlette.testclient import TestClient

    from sfllava_app.cli import build_parser
    from sfllava_app.serve import check_options
    from sfllava_app.serve.api import create_app
    from sfllava_app.serve.media import Media
    from sfllava_app.serve.worker import Worker

    media = tmp_path / "media"
    media.mkdir()
    video = media / "clip.mkv"
    shutil.copy(clips["mkv"][0], video)
    argv = ["serve", "--model", str(converted[LAYOUT]), "--media-dir", str(media)]
    args = build_parser(argv).parse_args(argv)
    worker = Worker(args)
    dirs = check_options(args)
    worker.start()
    try:
        app = create_app(worker, Media(dirs, str(tmp_path), 1 << 20), model_id="tiny",
                         model_arg=args.model)
        with TestClient(app, base_url="http://127.0.0.1") as http:  # no key: loopback only
            yield http, video
    finally:
        worker.stop()


def test_a_server_request_opens_its_video_once(server_app, count_opens):
    """A request that opens its video, then a follow-up the held conversation answers."""
    from sfllava_convert.tiny.command import first_message

    http, video = server_app
    messages = [first_message(f"file://{video}", "What happens?")]
    for cache in ("miss", "held"):
        opens, reply = count_opens(video, http.post, "/v1/chat/completions",
                                   json={"messages": messages, "max_tokens": 2})
        body = reply.json()
        assert reply.status_code == 200, body
        assert body["sfllava"]["cache"] == cache
        assert 1 <= opens <= MAX_OPENS, f"{cache}: {opens} opens of {video.name}"
        messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And then?"}]


def test_a_batch_opens_each_video_once_per_phase(clips, converted, tmp_path, cold_cache,
                                                 monkeypatch, count_opens):
    """Discovery (fingerprint, kind, options) and answering each open a video once, and
    nothing of it stays open in between (a library must not hold a descriptor a video)."""
    from sfllava_app.batch.run import Batch
    from sfllava_app.cli import main

    library = tmp_path / "library"
    library.mkdir()
    video = library / "clip.mkv"
    shutil.copy(clips["mkv"][0], video)
    (library / "notes.txt").write_text("not a video\n")
    phases, held = {}, []

    def counted(phase, method):
        def run(self, *args):
            before = Opens.watched.count
            try:
                return method(self, *args)
            finally:
                phases[phase] = Opens.watched.count - before
                held.extend(fds_of(video))
        return run

    monkeypatch.setattr(Batch, "discover", counted("discovery", Batch.discover))
    monkeypatch.setattr(Batch, "answer", counted("answering", Batch.answer))
    argv = ["batch", library, "--model", converted[LAYOUT], "--prompt", "What happens?",
            "--prompt", "Who is in it?", "--max-tokens", 2, "--out", tmp_path / "r.jsonl"]
    opens, code = count_opens(video, main, argv)
    assert code == 0
    assert held == [], "a descriptor of the video was left open"
    assert opens == sum(phases.values()), phases
    for phase, n in phases.items():
        assert 1 <= n <= MAX_OPENS, f"{phase}: {n} opens of {video.name} ({phases})"


@needs_ffmpeg
def test_a_refused_opening_leaves_no_descriptor(clips, converted, cold_cache):
    """A video the engine opened itself and then refused (the context too small for it)
    is closed with the refusal, in `prepare` and in `open`: a chat's `/video`, a page's plan
    or a batch's prefetch goes on without a descriptor left behind."""
    from sfllava_mlx import Engine
    from sfllava_mlx.errors import ContextOverflowError

    video = clips["mp4"][0]
    engine = Engine(converted[LAYOUT])
    for step in (engine.prepare, engine.open):
        with pytest.raises(ContextOverflowError):
            step(str(video), max_kv_size=8)
        assert fds_of(video) == [], step.__name__
