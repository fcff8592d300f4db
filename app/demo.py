"""`make demo`: the whole job on a built-in tiny model and a generated video.

Builds a tiny SF-LLaVA-1.5-shaped checkpoint with random weights, converts it with the
real converter, writes a short video, asks a question and prints the answer with the
stage timings. The tiny model is untrained: its answer is noise, by design.
"""

import shutil
import sys
from pathlib import Path

from sfllava_convert.tiny import Tower, write_source_checkpoint
from sfllava_convert.tiny.videos import moving_shapes, write_video

from .cli import main as sfllava

DEMO_DIR = Path("demo")
QUESTION = "What is moving in this video?"


def main() -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    source, model = DEMO_DIR / "tiny-source", DEMO_DIR / "tiny-mlx"
    shutil.rmtree(source, ignore_errors=True)
    print("1. a tiny SF-LLaVA-1.5-shaped checkpoint with random weights ->", source)
    write_source_checkpoint(source, "oryx-vit", tower=Tower(image_size=64, patch_size=8), seed=3)
    print("2. sfllava convert ->", model)
    status = sfllava(["convert", "--hf-path", str(source), "--mlx-path", str(model), "--force"])
    if status:
        return status
    # 6 s at 25 fps; FFV1 in .mkv is lossless and seek-exact
    video = write_video(DEMO_DIR / "shapes.mkv", moving_shapes(150, 320, 240), fps=25)
    print(f"3. sfllava generate on {video}: {QUESTION!r}")
    print("   (the tiny model is untrained: its answer is noise; see README for a real model)")
    return sfllava(["generate", "--model", str(model), "--video", str(video),
                    "--prompt", QUESTION, "--max-tokens", "24"])


if __name__ == "__main__":
    sys.exit(main())
