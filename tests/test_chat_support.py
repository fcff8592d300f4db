"""Shared by the chat and cache tests: a converted demo model, short videos, and the
`sfllava` command run in this process (cheap) or as a real process (the contract).

No tests here: helpers only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx

from sfllava_convert.tiny import write_source_checkpoint
from sfllava_convert.tiny.videos import make_ffv1_video

REPO = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FAST = ["--num-frames", "8"]


def demo_model(tmp: Path, name: str = "demo", seed: int = 0, exclaim: bool = False) -> Path:
    """`sfllava convert` of a tiny source checkpoint. exclaim=True zeroes the LLM's final
    norm: every logit is then equal, greedy decoding writes "!" (token 0) forever and never
    an end token, which makes an answer that is visible and as long as --max-tokens."""
    from sfllava_app.cli import main as sfllava

    src, dst = tmp / f"{name}-src", tmp / name
    write_source_checkpoint(src, layout="oryx-vit", seed=seed)
    assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(dst)]) == 0
    if exclaim:
        f = dst / "model.safetensors"
        weights = mx.load(str(f))
        key = "language_model.model.norm.weight"
        weights[key] = mx.zeros_like(weights[key])
        mx.save_safetensors(str(f), weights, {"format": "mlx"})
    return dst


def demo_video(path: Path, n_frames: int = 40, seed: int = 0) -> Path:
    make_ffv1_video(path, n_frames, seed=seed)
    return path


def run_inprocess(argv: list, stdin: str = "") -> tuple[int, str, str]:
    """The CLI in this process, with stdin from a string (not a terminal)."""
    from sfllava_app.cli import main as sfllava

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = sfllava([str(a) for a in argv])
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def env(cache_home: Path, **extra) -> dict:
    e = dict(os.environ)
    e.update(XDG_CACHE_HOME=str(cache_home), XDG_STATE_HOME=str(cache_home / "state"),
             PYTHONPATH=str(REPO), **{k: str(v) for k, v in extra.items()})
    if os.path.exists(OPENBLAS):
        e["LD_PRELOAD"] = OPENBLAS
    return e


def sfllava_cmd() -> list:
    return [sys.executable, "-c", "from sfllava_app.cli import entry; entry()"]


def run_process(argv: list, cache_home: Path, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sfllava_cmd() + [str(a) for a in argv], input=stdin, text=True,
                          capture_output=True, env=env(cache_home), cwd=REPO, timeout=timeout)


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]
