"""Helpers for tests/test_serve.py beside sfllava_convert.tiny.command's `Server`: videos as
data URLs, a model that never stops talking, a cut MP4, polling. No tests here."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path


def data_url(path: Path, media_type: str = "video/x-matroska") -> str:
    return f"data:{media_type};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def chatty_model(model_dir: Path, dst: Path) -> Path:
    """A copy of a converted model whose LLM final norm is zero: every logit is equal, so
    greedy decoding writes token 0 for ever and never an end token (answers as long as
    max_tokens: something to stop mid-stream)."""
    import mlx.core as mx

    shutil.copytree(model_dir, dst)
    f = dst / "model.safetensors"
    weights = mx.load(str(f))
    key = "language_model.model.norm.weight"
    weights[key] = mx.zeros_like(weights[key])
    mx.save_safetensors(str(f), weights, {"format": "mlx"})
    return dst


def truncated_mp4(src_frames_dir: Path, dst: Path) -> Path | None:
    """An MP4 cut short (its index, written last, is missing), or None without ffmpeg."""
    from sfllava_convert.tiny.videos import have_ffmpeg, make_ffmpeg_video

    if not have_ffmpeg():
        return None
    whole = src_frames_dir / "whole.mp4"
    make_ffmpeg_video(whole, 40)
    data = whole.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    os.unlink(whole)
    return dst


def wait_until(predicate, timeout: float = 60.0, step: float = 0.05):
    """Poll until predicate() is truthy (the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(step)
