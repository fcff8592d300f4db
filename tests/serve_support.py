"""Helpers for tests/test_serve.py: `sfllava serve` as a real process on a free loopback
port, and a model that never stops talking. No tests here."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import REPO, run_env, sfllava_command

READY = re.compile(r"on (http://127\.0\.0\.1:(\d+))/v1")


class Server:
    """`sfllava serve --port 0 ...`, started now; `wait()` until it listens.

    Its stderr is read on a thread (the log lines are kept in `log`), so the pipe never
    fills up."""

    def __init__(self, args: list, tmp: Path, cwd: Path = REPO, env: dict | None = None):
        self.log: list[str] = []
        self.url = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            sfllava_command(["serve", "--port", "0", *map(str, args)]), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, env={**run_env(tmp), **(env or {})}, cwd=cwd)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # it exited

    def wait(self, timeout: float = 180) -> Server:
        assert self._ready.wait(timeout), "the server never said it was listening"
        assert self.url, "the server exited:\n" + "\n".join(self.log)
        return self

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, api_key: str = "none", **kw):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0,
                             timeout=kw.pop("timeout", 180), **kw)

    def http(self, api_key: str | None = None, **kw):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 180), **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def first_message(video_url: str, question: str) -> dict:
    return {"role": "user", "content": [video_part(video_url), {"type": "text", "text": question}]}


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
    from tests.videos import have_ffmpeg, make_ffmpeg_video

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
