"""Frame sampling (design.md §1.1): the exact frames at floor((i + 0.5) * N / T), upright RGB, with
the container's timestamps, checked against independent decodes of the same files (OpenCV's
plain sequential read, ffprobe's frame list, or the frames written to a lossless file)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from sfllava_convert.tiny.videos import (
    have_ffmpeg,
    make_audio_only,
    make_ffmpeg_video,
    make_ffv1_video,
)
from sfllava_mlx import frames as F
from sfllava_mlx.errors import VideoError
from sfllava_mlx.frames import index as frame_index
from sfllava_mlx.frames import reader as frame_reader
from sfllava_mlx.frames import video as frame_video
from tests.videos import corrupt_frames, decode_all, ffprobe_frames

needs_ffmpeg = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed (make setup)")


def spec_indices(n: int, t: int) -> list[int]:
    return [math.floor((i + 0.5) * n / t) for i in range(t)]


def assert_exact(clip, reference, n_frames):
    """Every position holds the sampling rule's frame (design.md §1.1), pixel for pixel equal to the reference decode."""
    assert clip.exact
    assert clip.indices == spec_indices(n_frames, len(clip.images))
    for pos, (image, i) in enumerate(zip(clip.images, clip.indices)):
        assert image.dtype == np.uint8 and image.shape == reference[i].shape, pos
        assert np.array_equal(image, reference[i]), f"position {pos}: not frame {i}"


# ---------------------------------------------------------------------------------------------
# Positions and streams


@pytest.mark.parametrize("n,t", [(1, 128), (50, 128), (128, 128), (1000, 128), (30001, 128),
                                 (7, 3)])
def test_positions_follow_the_spec(n, t):
    assert F.sample_positions(n, t) == spec_indices(n, t)


def test_slow_and_fast_streams():
    names = F.stream_names(128, 4)
    assert names.count("slow") == 32 and names.count("fast") == 96
    assert [i for i, s in enumerate(names) if s == "slow"] == list(range(0, 128, 4))


# ---------------------------------------------------------------------------------------------
# Exact frames


def test_ffv1_exact_frames_and_timestamps(tmp_path):
    written = make_ffv1_video(tmp_path / "v.mkv", 300, fps=10)
    clip = F.read_frames(tmp_path / "v.mkv", num_frames=128)
    assert_exact(clip, written, 300)
    assert clip.timestamps == pytest.approx([i / 10 for i in clip.indices], abs=1e-6)
    assert clip.streams == F.stream_names(128, 4) and clip.replaced == []
    info = clip.info
    assert (info.width, info.height, info.num_frames, info.rotation) == (64, 48, 300, 0)
    assert info.fps == pytest.approx(10) and info.duration == pytest.approx(30)


def test_fewer_frames_than_positions_repeat_them(tmp_path):
    written = make_ffv1_video(tmp_path / "v.mkv", 50)
    clip = F.read_frames(tmp_path / "v.mkv", num_frames=128)
    assert_exact(clip, written, 50)
    assert len(set(clip.indices)) == 50


def test_one_frame_video(tmp_path):
    written = make_ffv1_video(tmp_path / "one.mkv", 1)
    clip = F.read_frames(tmp_path / "one.mkv", num_frames=128)
    assert clip.indices == [0] * 128
    assert all(np.array_equal(im, written[0]) for im in clip.images)
    assert clip.info.num_frames == 1


@needs_ffmpeg
@pytest.mark.parametrize("codec,bframes,ext", [("h264", 0, "mp4"), ("h264", 3, "mp4"),
                                               ("hevc", 4, "mp4"), ("h264", 2, "mkv")])
def test_long_gop_exact_against_sequential_decode(tmp_path, codec, bframes, ext):
    """Keyframes 60 frames apart, B-frame reordering (open GOP with HEVC): every frame exact."""
    path = tmp_path / f"v.{ext}"
    make_ffmpeg_video(path, 240, width=64, height=48, codec=codec, gop=60, bframes=bframes)
    reference = decode_all(path)
    assert len(reference) == 240
    for t in (128, 16):
        clip = F.read_frames(path, num_frames=t)
        assert_exact(clip, reference, 240)
    probe = ffprobe_frames(path)
    assert clip.timestamps == pytest.approx([probe[i][0] for i in clip.indices], abs=1e-6)


@needs_ffmpeg
def test_variable_frame_rate_and_a_lying_frame_count(tmp_path):
    """Irregular timestamps with pauses: OpenCV's count and its frame-number seek are wrong
    for this file; the sampler still returns the right frames with their true times."""
    times = [round(0.04 * i + 0.7 * (i // 25), 3) for i in range(100)]
    path = tmp_path / "vfr.mkv"
    make_ffmpeg_video(path, 100, codec="h264", gop=30, bframes=2, timestamps=times)
    reference = decode_all(path)
    cap = cv2.VideoCapture(str(path))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) != 100  # the container's metadata misleads
    wanted = F.sample_positions(100, 16)
    seek_wrong = 0
    for i in wanted:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, bgr = cap.read()
        seek_wrong += not ok or not np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), reference[i])
    assert seek_wrong > 0  # per-frame seeking (what mlx-vlm does) is not exact here

    clip = F.read_frames(path, num_frames=16)
    assert_exact(clip, reference, 100)
    assert clip.info.num_frames == 100
    assert clip.timestamps == pytest.approx([times[i] for i in clip.indices], abs=1e-6)


@needs_ffmpeg
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    path = tmp_path / "portrait.mp4"
    make_ffmpeg_video(path, 40, width=64, height=48, gop=20, rotation=rotation)
    reference = decode_all(path)  # OpenCV 5 rotates by default (CAP_PROP_ORIENTATION_AUTO)
    assert reference[0].shape[:2] == ((64, 48) if rotation in (90, 270) else (48, 64))
    clip = F.read_frames(path, num_frames=8)
    assert_exact(clip, reference, 40)
    assert (clip.info.height, clip.info.width) == reference[0].shape[:2]
    assert clip.info.rotation == rotation


# ---------------------------------------------------------------------------------------------
# Keyframe mode


@needs_ffmpeg
@pytest.mark.parametrize("codec,bframes", [("h264", 0), ("hevc", 4)])
def test_keyframe_mode_takes_the_keyframe_at_or_before(tmp_path, codec, bframes):
    path = tmp_path / "v.mp4"
    make_ffmpeg_video(path, 240, codec=codec, gop=50, bframes=bframes)
    reference = decode_all(path)
    probe = ffprobe_frames(path)
    keyframes = [i for i, (_, key) in enumerate(probe) if key]
    assert len(keyframes) >= 4
    clip = F.read_frames(path, num_frames=32, seek="keyframe")
    assert not clip.exact
    for i, used, image, t in zip(spec_indices(240, 32), clip.indices, clip.images, clip.timestamps):
        assert used == max(k for k in keyframes if k <= i)
        assert np.array_equal(image, reference[used])
        assert t == pytest.approx(probe[used][0], abs=1e-6)  # the keyframe's true time


# ---------------------------------------------------------------------------------------------
# Damaged files


@needs_ffmpeg
def test_corrupt_frames_are_replaced_by_nearest_neighbour(tmp_path):
    path = tmp_path / "damaged.mkv"
    written = make_ffmpeg_video(path, 60, codec="ffv1")  # lossless, every frame a keyframe
    corrupt_frames(path, [20, 21, 44])
    clip = F.read_frames(path, num_frames=60)
    assert sorted(clip.replaced) == [(20, 19), (21, 22), (44, 43)]
    for pos, (image, i) in enumerate(zip(clip.images, clip.indices)):
        assert i == {20: 19, 21: 22, 44: 43}.get(pos, pos)
        assert np.array_equal(image, written[i])


@needs_ffmpeg
def test_truncated_files(tmp_path):
    # MP4 whose index comes last (ffmpeg's default): cut, it cannot be read at all.
    path = tmp_path / "v.mp4"
    make_ffmpeg_video(path, 60, gop=20)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoError, match="incomplete MP4"):
        F.read_frames(cut, num_frames=8)
    # MP4 with its index first: the frames present are sampled, and the user is told.
    fast = tmp_path / "fast.mp4"
    make_ffmpeg_video(fast, 60, gop=20, extra=("-movflags", "+faststart"))
    cut.write_bytes(fast.read_bytes()[: fast.stat().st_size * 2 // 3])
    reference = decode_all(cut)
    clip = F.read_frames(cut, num_frames=8)
    assert 20 < clip.info.num_frames < 60 and clip.info.notes
    assert_exact(clip, reference, clip.info.num_frames)
    # Matroska cut mid-file: the frames before the cut.
    mkv = tmp_path / "v.mkv"
    make_ffmpeg_video(mkv, 60, gop=20)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    reference = decode_all(cut)
    clip = F.read_frames(cut, num_frames=8)
    assert abs(clip.info.num_frames - len(reference)) <= 1
    for image, i in zip(clip.images, clip.indices):
        assert np.array_equal(image, reference[min(i, len(reference) - 1)]) or i >= len(reference)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line (VideoError), exit status 2 from the command


def bad_inputs(tmp_path) -> dict:
    cases = {"missing": (tmp_path / "nope.mp4", "no such file"),
             "directory": (tmp_path, "is a directory"),
             "empty": (tmp_path / "empty.mp4", "is empty"),
             "text": (tmp_path / "notes.mp4", "not a video")}
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.mp4").write_text("shopping list: eggs, milk\n" * 20)
    if have_ffmpeg():
        make_audio_only(tmp_path / "song.m4a")
        cases["audio only"] = (tmp_path / "song.m4a", "no video stream")
    return cases


def test_bad_inputs_raise_one_clear_line(tmp_path):
    for name, (path, message) in bad_inputs(tmp_path).items():
        for call in (F.probe, F.read_frames, F.iter_frames):
            with pytest.raises(VideoError, match=message) as e:
                call(path)
            assert "\n" not in str(e.value), name


def test_file_still_being_written(tmp_path):
    """An MP4 being copied has no index yet and keeps growing: say so."""
    path = tmp_path / "copying.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 1000)
    stop = threading.Event()

    def grow():
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(b"\x00" * 4096)
                f.flush()
                time.sleep(0.02)

    writer = threading.Thread(target=grow)
    writer.start()
    try:
        with pytest.raises(VideoError, match="still being written"):
            F.read_frames(path)
    finally:
        stop.set()
        writer.join()


def test_resolution_too_large_for_memory(tmp_path, monkeypatch):
    make_ffv1_video(tmp_path / "v.mkv", 10)
    monkeypatch.setattr(frame_reader, "_available_memory", lambda: 100_000)  # 100 kB free
    with pytest.raises(VideoError, match="more than the 0.0 GB of memory available"):
        F.read_frames(tmp_path / "v.mkv", num_frames=128)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    from sfllava_app.cli import main

    # One run of the real command (its start-up is slow: once is enough) ...
    path, message = bad_inputs(tmp_path)["text"]
    proc = subprocess.run([sys.executable, "-c", "from sfllava_app.cli import entry; entry()", "frames",
                           str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # ... and every bad input through the same entry point, in this process.
    for name, (path, message) in bad_inputs(tmp_path).items():
        assert main(["frames", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, name


# ---------------------------------------------------------------------------------------------
# Streaming: header first, frames in position order, decoding bounded ahead of the consumer


def test_iter_frames_streams_in_order_with_backpressure(tmp_path):
    written = make_ffv1_video(tmp_path / "v.mkv", 200)
    with F.iter_frames(tmp_path / "v.mkv", num_frames=64, prefetch=2) as reader:
        assert reader.indices == spec_indices(200, 64)  # known before any frame arrives
        stream = iter(reader)
        first = next(stream)
        time.sleep(0.3)  # the worker may run ahead only as far as the queue allows
        assert reader._queue.qsize() <= 2
        rest = list(stream)
    positions = [first[0]] + [p for p, _ in rest]
    assert positions == list(range(64))
    images = [first[1]] + [im for _, im in rest]
    assert all(np.array_equal(im, written[i]) for im, i in zip(images, reader.indices))
    assert not images[0].flags.writeable


def test_closing_early_stops_the_worker(tmp_path):
    make_ffv1_video(tmp_path / "v.mkv", 200)
    reader = F.iter_frames(tmp_path / "v.mkv", num_frames=128, prefetch=1)
    next(iter(reader))
    reader.close()
    assert not reader._thread.is_alive()


@needs_ffmpeg
def test_exact_mode_decodes_no_more_than_either_simple_method(tmp_path):
    """Fewer frames decoded than one sequential pass, and than seeking for every frame."""
    path = tmp_path / "v.mp4"
    make_ffmpeg_video(path, 600, gop=100)
    with F.iter_frames(path, num_frames=8) as reader:
        list(reader)
    wanted = reader.indices
    floor = len(set().union(*(range(i - i % 100, i + 1) for i in wanted)))
    per_frame_seeks = sum(i % 100 + 1 for i in wanted)
    assert floor <= reader.decoded <= min(600, per_frame_seeks) + frame_video.SEEK_COST_FRAMES
    assert reader.decoded < 600


# ---------------------------------------------------------------------------------------------
# `sfllava frames`


@needs_ffmpeg
def test_frames_command_json_and_out(tmp_path, capsys):
    from sfllava_app.cli import main

    path = tmp_path / "portrait.mp4"
    make_ffmpeg_video(path, 90, width=64, height=48, gop=30, rotation=90)
    reference = decode_all(path)
    out = tmp_path / "out"
    assert main(["frames", str(path), "--num-frames", "12", "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout carries only the JSON
    assert set(doc) == {"frames", "exact", "timings_s", "recipe", "visual_tokens"} and doc["exact"] is True
    # design.md §1.5 without --model: 3 slow frames x 12 x 12 + 9 fast x 6 x 6
    assert doc["recipe"] == "native" and doc["visual_tokens"] == 3 * 144 + 9 * 36
    assert [f["index"] for f in doc["frames"]] == spec_indices(90, 12)
    assert [f["stream"] for f in doc["frames"]] == F.stream_names(12, 4)
    probe = ffprobe_frames(path)
    assert [f["timestamp"] for f in doc["frames"]] == pytest.approx(
        [probe[i][0] for i in spec_indices(90, 12)], abs=1e-5)
    assert doc["timings_s"]["frames"] > 0
    for pos, i in enumerate(spec_indices(90, 12)):
        png = cv2.cvtColor(cv2.imread(str(out / f"{pos:03d}.png")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(png, reference[i])  # lossless, upright, own resolution
    assert (out / "contact.png").exists() and len(list(out.iterdir())) == 13

    # keyframe mode: JSON says so, and a note on stderr
    assert main(["frames", str(path), "--num-frames", "12", "--seek", "keyframe", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["exact"] is False and "approximate" in captured.err


def test_frames_command_table_and_model_settings(tmp_path, capsys):
    from sfllava_app.cli import main
    from sfllava_mlx.config import ModelConfig

    make_ffv1_video(tmp_path / "v.mkv", 100)
    model = tmp_path / "model"
    model.mkdir()
    cfg = ModelConfig.from_dict({"model_type": "sfllava", "layout": "oryx-vit", "text_config": {},
                                 "sampling": {"num_frames": 10, "slow_every": 5}})
    cfg.save(model)
    assert main(["frames", str(tmp_path / "v.mkv"), "--model", str(model), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["index"] for f in doc["frames"]] == spec_indices(100, 10)
    assert [f["stream"] for f in doc["frames"]] == F.stream_names(10, 5)

    assert main(["frames", str(tmp_path / "v.mkv"), "--num-frames", "6", "--seek", "keyframe"]) == 0
    out = capsys.readouterr().out
    assert "APPROXIMATE" in out and "approximate sampling" in out
    import av

    with av.open(str(tmp_path / "v.mkv")) as c:  # keyframes as the packets flag them
        keyframes = [i for i, p in enumerate(c.demux(video=0)) if p.size and p.is_keyframe]
    assert len(keyframes) > 1
    for i in F.sample_positions(100, 6):
        assert f" {max(k for k in keyframes if k <= i)} " in out

    assert main(["frames", str(tmp_path / "v.mkv"), "--model", str(tmp_path / "nomodel")]) == 2


@needs_ffmpeg
def test_a_misleading_sample_table_is_not_trusted(tmp_path, monkeypatch):
    """If the MP4 sample table's times are not the decoded frames' times, the packets are
    indexed instead, and the frames stay exact."""
    path = tmp_path / "v.mp4"
    make_ffmpeg_video(path, 120, gop=40)
    real = frame_index._rows_from_sample_table

    def shifted(*args):
        rows, truncated = real(*args)
        return [(ts + 7, key) for ts, key in rows], truncated

    monkeypatch.setattr(frame_index, "_rows_from_sample_table", shifted)
    clip = F.read_frames(path, num_frames=16)
    assert_exact(clip, decode_all(path), 120)
