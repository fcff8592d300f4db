"""Frames by time (design.md §2.2): `--fps`, `--timestamps`, the video cache's keys, and the
memory plan that refuses a request before any work starts.

The positions are held to the sampling formula (design.md §1.1) computed here from ffprobe's frame list and
average frame rate; the time instruction to a literal built from OpenCV's timestamps and
the torch reference's answer with that prompt.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny.command import REPO, run_env, sfllava_command
from sfllava_convert.tiny.videos import have_ffmpeg, make_ffmpeg_video, make_ffv1_video
from tests.conftest import LOGPROB_TOL, MAX_TOKENS, QUESTION, sfllava
from tests.videos import ffprobe_frames

needs_ffmpeg = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg is not installed")
LAYOUT = "oryx-vit"


def ffprobe_rate_and_count(path) -> tuple[float, int]:
    """(average frame rate, frames) as ffprobe reports them: independent of PyAV and OpenCV."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames",
                          "-show_entries", "stream=avg_frame_rate,nb_read_frames", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True)
    stream = json.loads(out.stdout)["streams"][0]
    num, den = stream["avg_frame_rate"].split("/")
    return int(num) / int(den), int(stream["nb_read_frames"])


def spec_count(num_frames: int, n: int, rate: float, fps: float) -> int:
    return min(num_frames, max(1, math.ceil(n / rate * fps)))


def midpoint(n: int, t: int) -> list:
    return [int(np.floor((i + 0.5) * n / t)) for i in range(t)]


def frames_json(tmp: Path, video, *flags) -> dict:
    r = sfllava(["frames", video, "--json", *flags], tmp)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------------------
# Positions


@needs_ffmpeg
@pytest.mark.parametrize("n,rate,fps,num_frames", [
    (50, 10.0, 2.0, 128),     # a 5 s clip: 10 frames, not 128
    (300, 25.0, 1.0, 128),    # 12 s at 25 fps: 12
    (90, 30.0, 0.5, 128),     # 3 s: ceil(1.5) = 2
    (400, 10.0, 1.0, 16),     # 40 s, but the recipe's T (here --num-frames 16) caps it
    (7, 24.0, 0.1, 128),      # shorter than a period: at least one frame
])
def test_fps_positions_follow_the_spec(tmp_path, n, rate, fps, num_frames):
    video = tmp_path / "clip.mkv"
    make_ffmpeg_video(video, n, fps=rate, codec="ffv1")
    avg, count = ffprobe_rate_and_count(video)
    t = spec_count(num_frames, count, avg, fps)
    doc = frames_json(tmp_path, video, "--fps", fps, "--num-frames", num_frames)
    assert [f["index"] for f in doc["frames"]] == midpoint(count, t)
    assert [f["stream"] for f in doc["frames"]] == ["slow" if i % 4 == 0 else "fast" for i in range(t)]


@needs_ffmpeg
def test_fps_on_a_variable_frame_rate_file(tmp_path):
    """VFR: D is the frame count over the average frame rate of the frames' timestamps."""
    times = [0.0]
    for i in range(1, 60):
        times.append(times[-1] + (0.04 if i % 3 else 0.25))  # bursts and pauses
    video = tmp_path / "vfr.mkv"
    make_ffmpeg_video(video, len(times), codec="ffv1", timestamps=times)
    # The container's nominal rate is not the average here (mkv keeps the writer's -r 10):
    # the average frame rate is the one over the frames' own times, from ffprobe's frame list.
    probed = [t for t, _ in ffprobe_frames(video)]
    count = len(probed)
    assert count == len(times) and ffprobe_rate_and_count(video)[0] == 10.0
    avg = (count - 1) / (probed[-1] - probed[0])
    t = spec_count(128, count, avg, 3.0)
    assert t != spec_count(128, count, 10.0, 3.0)  # the nominal rate would sample otherwise
    doc = frames_json(tmp_path, video, "--fps", 3)
    assert [f["index"] for f in doc["frames"]] == midpoint(count, t)
    # Each position's time is that frame's own presentation time, not index / fps.
    assert [f["timestamp"] for f in doc["frames"]] == pytest.approx(
        [times[i] for i in midpoint(count, t)], abs=1e-3)


def test_fps_must_be_positive(tmp_path):
    video = tmp_path / "v.mkv"
    make_ffv1_video(video, 10)
    r = sfllava(["frames", video, "--fps", "0"], tmp_path)
    assert r.returncode == 2 and "--fps must be a number greater than 0" in r.stderr


# ----------------------------------------------------------------------------------------
# The time instruction, against the torch reference


def opencv_time_instruction(video: Path, indices: list) -> str:
    """design.md §2.2's line built from OpenCV's frame times and frame rate."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    duration = n / cap.get(cv2.CAP_PROP_FPS)
    times = {}
    for i in range(n):
        ok = cap.grab()
        assert ok
        times[i] = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
    cap.release()
    stamps = ",".join(f"{times[i]:.2f}s" for i in indices)
    return (f"The video lasts for {duration:.2f} seconds, and {len(indices)} frames are uniformly "
            f"sampled from it. These frames are located at {stamps}.Please answer the following "
            "questions related to this video.")


@pytest.mark.slow
def test_timestamps_answer_matches_the_reference(tmp_path, sources, converted, videos):
    """generate --fps 2 --timestamps equals the torch reference fed the same 32 frames and
    the question with the time instruction before it."""
    from tests.reference import Reference

    video = videos["main"]  # 160 frames at 10 fps: 16 s -> 32 frames at 2 fps
    r = sfllava(["generate", "--model", converted[LAYOUT], "--video", video, "--prompt", QUESTION,
                 "--max-tokens", MAX_TOKENS, "--json", "--fps", 2, "--timestamps", "--no-cache"],
                tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ref = Reference(sources[LAYOUT], num_frames=32)
    frames, idx = ref.read_frames(video)
    question = opencv_time_instruction(video, idx) + "\n" + QUESTION
    visual = ref.visual_tokens_from_pixels(ref.preprocess(frames))
    want = ref.greedy(ref.prompt_embeddings(visual, question), MAX_TOKENS)
    assert got["tokens"] == want.tokens
    assert np.max(np.abs(np.array(got["logprobs"]) - np.array(want.logprobs))) < LOGPROB_TOL
    # The prompt really carried the instruction: its tokens are counted in the prefill.
    before, after = ref.prompt_pieces(question)
    assert got["prompt_tokens"] == len(before) + visual.shape[0] + len(after)
    # Without --timestamps the answer is another one (the fixture follows its prompt).
    plain = ref.greedy(ref.prompt_embeddings(visual, QUESTION), MAX_TOKENS)
    assert plain.tokens != want.tokens


# ----------------------------------------------------------------------------------------
# The video cache keys on the frames, not on the question


@pytest.mark.slow
def test_cache_keys_on_fps_and_frame_count(tmp_path, converted, videos):
    def ask(*flags):
        r = sfllava(["generate", "--model", converted[LAYOUT], "--video", videos["main"],
                     "--prompt", QUESTION, "--max-tokens", 4, "--json", *flags], tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = ask("--fps", 2)
    assert first["cache"] == "miss"
    assert ask("--fps", 2)["cache"] == "hit"
    other = ask("--fps", 3)  # 48 frames: other frames, never the 32-frame entry
    assert other["cache"] == "miss" and other["visual_tokens"] != first["visual_tokens"]
    assert ask("--num-frames", 32)["cache"] == "miss"  # 32 frames over all 16 s, not by rate
    # --timestamps changes only the question: the cached video serves it, with the answer
    # the uncached run gives.
    timed = ask("--fps", 2, "--timestamps")
    fresh = ask("--fps", 2, "--timestamps", "--no-cache")
    assert timed["cache"] == "hit" and fresh["cache"] == "off"
    assert timed["tokens"] == fresh["tokens"]
    assert timed["prompt_tokens"] < fresh["prompt_tokens"]  # the video's prefix came cached


# ----------------------------------------------------------------------------------------
# The memory plan


@pytest.mark.slow
def test_a_request_that_cannot_fit_is_refused_before_any_work(tmp_path, converted, videos):
    r = subprocess.run(
        sfllava_command(["generate", "--model", converted[LAYOUT], "--video", videos["main"],
                         "--prompt", QUESTION, "--max-tokens", 4, "--json"]),
        capture_output=True, text=True, timeout=180, cwd=REPO,
        env={**run_env(tmp_path), "SFLLAVA_MEMORY_LIMIT_GB": "0.003"})
    assert r.returncode == 2 and r.stdout == ""
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: this request needs about") and "SFLLAVA_MEMORY_LIMIT_GB" in first
    assert "--num-frames" in first and "Traceback" not in r.stderr
    # Nothing was decoded or cached.
    assert not list((tmp_path / "xdg-cache").rglob("visual.safetensors"))


@pytest.mark.slow
def test_a_video_past_the_context_is_refused_before_decoding(tmp_path, converted, videos):
    r = sfllava(["generate", "--model", converted[LAYOUT], "--video", videos["main"], "--prompt",
                 QUESTION, "--max-kv-size", 200, "--max-tokens", 4], tmp_path)
    assert r.returncode == 2
    first = r.stderr.splitlines()[0]
    assert "pass --max-kv-size of 200" in first and "--num-frames" in first
    assert not list((tmp_path / "xdg-cache").rglob("visual.safetensors"))


def test_the_plan_counts_the_kv_cache_and_long_videos():
    """Plan arithmetic at the real shapes (lazy random weights: nothing allocated)."""
    from sfllava_app.bench.random_weights import model_config
    from sfllava_mlx.memory import kv_bytes_per_token, plan_video
    from sfllava_mlx.model import SFLLaVA

    config = model_config("1.5b")
    model = SFLLaVA(config)
    # Qwen2.5-1.5B: 28 layers x 2 KV heads x 128 dims x (K, V) x 2 bytes = 28 KB a token.
    assert kv_bytes_per_token(config, 2) == 28 * 2 * 128 * 2 * 2
    assert kv_bytes_per_token(config, 2, kv_bits=8) < kv_bytes_per_token(config, 2) * 0.6
    sampling = config.recipe()
    plans = {t: plan_video(model, type(sampling)(num_frames=t), max_tokens=512)
             for t in (128, 256, 512)}
    assert plans[256].kv_cache > 1.9 * plans[128].kv_cache * 0.95
    assert plans[512].total > plans[256].total > plans[128].total
    assert plans[128].weights == plans[512].weights
