"""Time `sfllava convert` on a checkpoint with the real SF-LLaVA-1.5-1.5B shapes.

Writes a random bfloat16 source checkpoint (Qwen2.5-1.5B + Oryx-ViT + projector, ~4 GB)
under --work (default /tmp, never the repository), converts it with the real command
line for each variant, and reports wall time, the converter process's peak RSS and
the converted size on disk. Everything it wrote is deleted unless --keep.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python bench/convert_bench.py [--variants bf16,q8,q4] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert.tiny import write_source_checkpoint  # noqa: E402

# SF-LLaVA-1.5-1B: Qwen2.5-1.5B, Oryx-ViT (SPEC §3), mlp2x_gelu projector 1152 -> 1536.
SHAPES_1_5B = dict(
    hidden=1536, llm_layers=28, heads=12, kv_heads=2, intermediate=8960, vocab_size=151936, tied=True,
    vision_hidden=1152, vision_layers=27, vision_heads=16, vision_mlp=4304, patch_size=16,
    image_size=384, pos_grid=128,
)
VARIANTS = {
    "bf16": ["--dtype", "bfloat16"],
    "q8": ["--dtype", "bfloat16", "-q", "--q-bits", "8"],
    "q4": ["--dtype", "bfloat16", "-q", "--q-bits", "4"],
    "f32": ["--dtype", "float32"],  # what the CPU backend picks by default
}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_measured(cmd: list, env: dict) -> tuple[float, int, str]:
    """(wall seconds, exit status, stdout + stderr)."""
    start = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, p.returncode, p.stdout + p.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--variants", default="bf16,q8,q4", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--shards", type=int, default=2, help="source safetensors shards")
    ap.add_argument("--llm-layers", type=int, default=None, help="fewer LLM layers (a quick check)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="sfllava-convert-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    shapes = dict(SHAPES_1_5B)
    if args.llm_layers:
        shapes["llm_layers"] = args.llm_layers
    env = dict(os.environ, PYTHONPATH=str(REPO))
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    if Path(openblas).exists():
        env["LD_PRELOAD"] = openblas
    exe = Path(sys.executable).parent / "sfllava"
    sfllava = [str(exe)] if exe.exists() else [sys.executable, "-c", "from app.cli import entry; entry()"]
    # GNU time prints the child's peak RSS (KB) as the last line of stderr
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []

    try:
        src = work / "src"
        t = time.perf_counter()
        write_source_checkpoint(src, "oryx-vit", dtype="bfloat16", shards=args.shards, seed=0, **shapes)
        print(f"source checkpoint: {dir_size(src) / 1e9:.2f} GB bfloat16 in {args.shards} shards, "
              f"written in {time.perf_counter() - t:.0f} s", flush=True)

        rows = []
        for name in args.variants.split(","):
            dst = work / f"mlx-{name}"
            cmd = timer + sfllava + ["convert", "--hf-path", str(src), "--mlx-path", str(dst),
                                     "--force", *VARIANTS[name]]
            wall, rc, output = run_measured(cmd, env)
            if rc != 0:
                print(output)
                raise SystemExit(f"{name}: sfllava convert failed ({rc})")
            peak_kb = int(output.strip().splitlines()[-1]) if timer else 0  # time -f %M: KB
            rows.append((name, wall, peak_kb * 1024, dir_size(dst)))
            print(f"{name}: {wall:.1f} s, peak RSS {peak_kb / 2**20:.2f} GiB, "
                  f"{dir_size(dst) / 1e9:.2f} GB on disk", flush=True)
            shutil.rmtree(dst)

        print("\n| variant | wall (s) | peak RSS (GiB) | size on disk (GB) |")
        print("|---|---|---|---|")
        for name, wall, rss, size in rows:
            print(f"| {name} ({' '.join(VARIANTS[name])}) | {wall:.1f} | {rss / 2**30:.2f} | {size / 1e9:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
