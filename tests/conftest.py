"""Session fixtures shared by the numeric tests: tiny source checkpoints of both layouts,
their conversions by the real converter, test videos, and `sfllava` run as a user runs it.

The tiny checkpoints are random, so out of the box their answers barely depend on the
video (near-uniform logits, diffuse attention). `sharpen` rescales a few tensors of the
source checkpoint so that attention is peaked and the LLM's answer follows the visual
tokens: then every usual porting mistake changes the greedy answer (tests/test_mistakes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sfllava_convert.tiny.checkpoint import sharpen
from sfllava_convert.tiny.command import REPO, run_env, sfllava_command

LAYOUTS = ("oryx-vit", "llava-siglip")
QUESTION = "What happens in this video?"
FOLLOW_UP = "What color is the car?"
MAX_TOKENS = 8
LOGPROB_TOL = 5e-4  # the issues' bound for `generate --json` logprobs against a reference
SEED = 0  # tiny checkpoint seed; tests/test_mistakes.py checks the answer stays decisive
# The tiny shape is sfllava_convert.tiny's defaults (SHARPEN was tuned on them): frames 32 px,
# patch 8 -> G = G0 = 4, so 32 slow frames x 2x2 + 96 fast frames x 1x1 = 224 visual tokens.

def sfllava(args: list, tmp: Path, stdin: str | None = None, timeout: float = 180):
    """Run the `sfllava` command in a subprocess, as a user (or a script) would."""
    return subprocess.run(sfllava_command(args), input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=run_env(tmp), cwd=REPO)


def json_lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def convert_checkpoint(src: Path, dst: Path, *flags) -> Path:
    """`sfllava convert --hf-path SRC --mlx-path DST [flags]`, in this process (the real
    command-line entry, without a second interpreter's start-up)."""
    from sfllava_app.cli import main

    status = main(["convert", "--hf-path", str(src), "--mlx-path", str(dst), *map(str, flags)])
    assert status == 0, f"sfllava convert exited with {status}"
    return dst


def with_image_size(model_dir: Path, dst: Path, image_size: int) -> Path:
    """A copy of a converted model whose frames are `image_size` pixels (G != G0)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["vision_config"]["image_size"] = image_size
    cfg["preprocess"]["image_size"] = image_size
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel a plain `pip install .` would build, built once per run."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out), str(REPO)], capture_output=True, text=True,
                           timeout=300, cwd=out)
    assert build.returncode == 0, build.stderr
    [path] = out.glob("sfllava_mlx-*.whl")
    return path


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("numerics")


@pytest.fixture(scope="session")
def videos(work) -> dict:
    """main: more frames than positions, larger than S (area resize); other: same size,
    other content; short: fewer frames than positions (indices repeat), smaller than S
    (cubic resize)."""
    from sfllava_convert.tiny.videos import make_ffv1_video

    spec = {"main": (160, 48, 40, 0), "other": (160, 48, 40, 1), "short": (40, 24, 16, 2)}
    out = {}
    for name, (n, w, h, seed) in spec.items():
        out[name] = work / f"{name}.mkv"
        make_ffv1_video(out[name], n, width=w, height=h, seed=seed)
    return out


@pytest.fixture(scope="session")
def sources(work) -> dict:
    """Tiny sharpened source checkpoints with Hugging Face names, one per layout."""
    from sfllava_convert.tiny import write_source_checkpoint

    out = {}
    for layout in LAYOUTS:
        src = write_source_checkpoint(work / f"src-{layout}", layout=layout, seed=SEED)
        sharpen(src)
        out[layout] = src
    return out


@pytest.fixture(scope="session")
def converted(work, sources) -> dict:
    """Each source converted by the real converter (float32)."""
    return {layout: convert_checkpoint(src, work / f"mlx-{layout}", "--dtype", "float32")
            for layout, src in sources.items()}


@pytest.fixture(scope="session")
def references(sources) -> dict:
    from tests.reference import Reference

    return {layout: Reference(src) for layout, src in sources.items()}


@pytest.fixture(scope="session")
def mlx_models(converted) -> dict:
    from sfllava_mlx import load

    return {layout: load(path) for layout, path in converted.items()}


@pytest.fixture(scope="session")
def reference_answers(references, videos) -> dict:
    """The torch reference's greedy answer to QUESTION about the main video, per layout."""
    return {layout: ref.answer(videos["main"], QUESTION, MAX_TOKENS)
            for layout, ref in references.items()}


@pytest.fixture(scope="session")
def cli_answers(work, converted, videos) -> dict:
    """`sfllava generate --json` on the main video, per layout (both run side by side:
    most of each run is Python importing its modules)."""
    runs = {}
    for layout, model_dir in converted.items():
        args = ["generate", "--model", model_dir, "--video", videos["main"], "--prompt", QUESTION,
                "--max-tokens", MAX_TOKENS, "--json"]
        runs[layout] = subprocess.Popen(sfllava_command(args), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=run_env(work), cwd=REPO)
    out = {}
    for layout, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        out[layout] = json.loads(stdout)
    return out


@pytest.fixture
def no_decoding(monkeypatch):
    """Opening a video decodes no frame past its first (the check that it decodes at all):
    any frame reader made fails the test."""
    import sfllava_mlx.media

    def refuse(*a, **k):
        raise AssertionError("a frame was about to be decoded")

    monkeypatch.setattr(sfllava_mlx.media, "FrameReader", refuse)
