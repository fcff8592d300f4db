"""How long a user waits for `--help` and for the first line of a mistake, beside the cost of
importing the library at all (`python -c "import sfllava_mlx"`), side by side in one run.

    python -m bench.startup_bench [--model DIR] [--runs 7] [--against PYTHON]

Each command is a fresh process, run `--runs` times round-robin (the medians are reported,
with each one's ratio to the import baseline). Without `--model` a tiny model is written to a
temporary directory. The mistakes: a missing video, a missing model directory, a value
outside its rule (`--fps 0`) — each checked before mlx-lm, transformers or torch is imported.
`--against` names the interpreter of another checkout (its venv's python): its commands run
in the same rounds, a column beside ours.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands(python: str, model: str, video: str, tmp: str) -> dict:
    cli = [python, "-m", "sfllava_app.cli"]
    ask = ["--prompt", "What happens?"]
    return {
        'python -c "import sfllava_mlx"': [python, "-c", "import sfllava_mlx"],
        "sfllava --help": [*cli, "--help"],
        "sfllava generate --help": [*cli, "generate", "--help"],
        "generate: missing video": [*cli, "generate", "--model", model, "--video",
                                    f"{tmp}/missing.mkv", *ask],
        "generate: missing model": [*cli, "generate", "--model", f"{tmp}/no-model", "--video",
                                    video, *ask],
        "generate --fps 0": [*cli, "generate", "--model", model, "--video", video, "--fps", "0",
                             *ask],
        "batch --top-p 1.5": [*cli, "batch", video, "--model", model, "--out", f"{tmp}/o.jsonl",
                              "--top-p", "1.5", *ask],
    }


def timed(cmd: list) -> float:
    tic = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=False)
    return time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory (default: a tiny one)")
    p.add_argument("--runs", type=int, default=7, help="runs of each command")
    p.add_argument("--against", default=None, metavar="PYTHON",
                   help="another checkout's interpreter, timed beside this one")
    args = p.parse_args()

    from sfllava_convert.tiny.videos import make_ffv1_video

    with tempfile.TemporaryDirectory() as tmp:
        video = str(Path(tmp) / "clip.mkv")
        make_ffv1_video(video, 20, width=48, height=40)
        model = args.model or tiny_model(Path(tmp))
        pythons = [sys.executable] + ([args.against] if args.against else [])
        cmds = [commands(py, model, video, tmp) for py in pythons]
        times = [{name: [] for name in c} for c in cmds]
        for _ in range(args.runs):
            for c, t in zip(cmds, times):
                for name, cmd in c.items():
                    t[name].append(timed(cmd))
    medians = [{name: statistics.median(v) for name, v in t.items()} for t in times]
    base = next(iter(medians[0].values()))
    head = f"| command | this checkout, median of {args.runs} (s) | vs import |"
    if args.against:
        head += " the other (s) | the other / this |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, t in medians[0].items():
        row = f"| {name} | {t:.3f} | {t / base:.2f}x |"
        if args.against:
            other = medians[1][name]
            row += f" {other:.3f} | {other / t:.1f}x |"
        print(row)


def tiny_model(tmp: Path) -> str:
    """A tiny converted model (the demo's), written once for the run."""
    from sfllava_app.cli import main as cli
    from sfllava_convert.tiny.checkpoint import write_source_checkpoint

    src, dst = tmp / "src", tmp / "model"
    write_source_checkpoint(src, "oryx-vit")
    assert cli(["convert", "--hf-path", str(src), "--mlx-path", str(dst)]) == 0
    return str(dst)


if __name__ == "__main__":
    main()
