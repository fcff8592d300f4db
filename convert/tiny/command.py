"""`sfllava` run as a user runs it, for the tests and the benchmarks: its console command in
a subprocess with OpenBLAS and a private video cache, and `sfllava serve` on a free loopback
port (`Server`), with the OpenAI message its clients send first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

# The checkout these helpers run from (tests/ and bench/ live beside convert/).
REPO = Path(__file__).resolve().parents[2]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
READY = re.compile(r"on (http://127\.0\.0\.1:(\d+))/v1")


def run_env(tmp: Path) -> dict:
    env = dict(os.environ)
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS  # MLX's CPU matmul is ~40x faster with it
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")  # the video cache stays in the caller's tmp
    env["PYTHONPATH"] = str(REPO)
    return env


def sfllava_command(args: list) -> list:
    exe = Path(sys.executable).parent / "sfllava"  # the console script pip installed
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from sfllava_app.cli import entry; entry()"]
    return cmd + [str(a) for a in args]


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
