"""The checkpoints users already have (design.md §5.4): what loading them in place and converting
them on first use cost, side by side in one run.

Writes a random float32 llava-hf checkpoint (transformers' `save_pretrained`; --shapes), converts it
once with mlx-vlm (`python -m mlx_vlm convert --dtype float32`) and once with `sfllava
convert --dtype float32`, then measures, each run in a fresh process (the OS page cache warm
after the first), alternating:

- load: `sfllava_mlx.load` of the mlx-vlm directory (in place: names mapped at load) vs of
  our own conversion (target <= 1.1x);
- first use: `load` of the Hugging Face directory into an empty converted-model cache vs
  `sfllava convert` + `load` of its output (target <= 1.05x), with each process's peak MLX
  memory (`mx.get_peak_memory()`) and peak RSS.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m bench.checkpoints_bench [--reps 3] [--shapes small|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.mlx_vlm_bench import SHAPES_0_5B, SHAPES_TINY, write_checkpoint
from sfllava_convert.tiny.command import REPO

# llava-onevision-qwen2-0.5b-ov's widths with 8 LLM layers, a 32k vocabulary and 4 tower
# blocks: about 0.2 B parameters (0.8 GB in float32), so that a load takes about a second.
SHAPES = {
    "small": dict(text=dict(SHAPES_0_5B["text"], num_hidden_layers=8, vocab_size=32000),
                  vision=dict(SHAPES_0_5B["vision"], num_hidden_layers=4)),
    "tiny": SHAPES_TINY,
}

CHILD = """
import json, resource, sys, time
import mlx.core as mx
from sfllava_mlx.model import load
what, src, dst = sys.argv[1:4]
start = time.perf_counter()
if what == "convert+load":
    from sfllava_mlx.checkpoints.convert import convert
    convert(src, dst, dtype="float32")
    src = dst
model, _ = load(src, cache_dir=dst if what == "first-use" else None)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mlx": mx.get_peak_memory(),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(what: str, src: Path, dst: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(src), str(dst)],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise SystemExit(f"{what} {src} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", choices=list(SHAPES), default="small")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="checkpoints-bench-"))
    try:
        src = write_checkpoint(work / "src", SHAPES[args.shapes])
        subprocess.run([sys.executable, "-m", "mlx_vlm", "convert", "--hf-path", str(src),
                        "--mlx-path", str(work / "mlx-vlm"), "--dtype", "float32"],
                       check=True, capture_output=True)
        child("convert+load", src, work / "ours")  # our conversion, kept for the load runs
        runs: dict = {k: [] for k in ("load mlx-vlm", "load ours", "first use", "convert+load")}
        for i in range(args.reps):
            runs["load mlx-vlm"].append(child("load", work / "mlx-vlm", work))
            runs["load ours"].append(child("load", work / "ours", work))
            runs["first use"].append(child("first-use", src, work / f"cache-{i}"))
            runs["convert+load"].append(child("convert+load", src, work / f"converted-{i}"))
        report(runs, args, os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(runs: dict, args, load: float) -> None:
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    print(f"shapes {args.shapes}, {args.reps} runs each (median), load average {load:.1f}")
    for k, m in med.items():
        print(f"  {k:14s} {m['seconds']:6.2f} s   peak MLX {m['peak_mlx'] / 1e9:5.2f} GB"
              f"   peak RSS {m['peak_rss'] / 1e9:5.2f} GB")
    ratio = lambda a, b, f="seconds": med[a][f] / med[b][f]  # noqa: E731
    print(f"load mlx-vlm / load ours:           {ratio('load mlx-vlm', 'load ours'):.2f}x (target <= 1.1)")
    print(f"first use / convert + load:         {ratio('first use', 'convert+load'):.2f}x (target <= 1.05)")
    print(f"peak MLX memory, first use / convert + load: "
          f"{ratio('first use', 'convert+load', 'peak_mlx'):.2f}x")
    print(f"peak RSS, first use / convert + load:        "
          f"{ratio('first use', 'convert+load', 'peak_rss'):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
