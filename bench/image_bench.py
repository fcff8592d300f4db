"""A 1920x1080 photo through each family's image recipe (design.md §2.3) next to the same photo
as a one-frame video (the only way before pictures existed): visual tokens and time to
first token, and their ratios.

    python -m bench.image_bench [--sizes tiny,mid] [--runs 2] [--json]

Random weights (`sfllava_app.bench.random_weights.build_random`), float32, the video cache off,
one process per call, each run after a warm-up; the median TTFT of `--runs` is reported.
- tiny: the test fixtures' shapes (SF-LLaVA-1.5: 32 px frames, patch 8; LLaVA-OneVision:
  28 px, patch 4, the any-resolution grid scaled to 28 px tiles).
- mid: the real picture geometry (384 px; patch 16 for SF-LLaVA-1.5, 14 for OneVision with
  its real 384 px any-resolution grid: the visual token counts are the real models'), on a
  small tower (384 wide, 4 blocks) and a small Qwen2 (896 wide, 8 layers): the shares of the
  tower and the prefill differ from a real model's, the token counts do not.
TTFT counts from the open (decode, tiles or frames, tower, prefill) to the first token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

QWEN_MID = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=8, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                tie_word_embeddings=True)
QWEN_TINY = dict(QWEN_MID, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=700)


def config(family: str, size: str):
    from sfllava_mlx.config import (
        ONEVISION_PINPOINTS,
        ImageConfig,
        ModelConfig,
        PreprocessConfig,
        ProjectorConfig,
        PromptConfig,
        VisionConfig,
        family_recipes,
    )

    ov = family == "llava-onevision"
    if size == "tiny":
        S, P = (28, 4) if ov else (32, 8)
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=S, patch_size=P, pos_grid=S // P,
                              feature_layer=3, hidden_act="gelu_pytorch_tanh" if ov else "gelu",
                              pos_interpolation="bicubic" if ov else "bilinear")
        text = QWEN_TINY
    else:
        S, P = 384, (14 if ov else 16)
        vision = VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                              num_attention_heads=6, image_size=S, patch_size=P,
                              pos_grid=27 if ov else 128, feature_layer=4,
                              hidden_act="gelu_pytorch_tanh" if ov else "gelu",
                              pos_interpolation="bicubic" if ov else "bilinear")
        text = QWEN_MID
    if ov:
        recipes = family_recipes(family, "bilinear", "one_token")
        pins = (ONEVISION_PINPOINTS if S == 384 else
                [[S * i, S * j] for i in range(1, 7) for j in range(1, 7)])
        image = ImageConfig("anyres_max_9", pins)
    else:
        recipes = family_recipes(family)
        image = ImageConfig("single")
    return ModelConfig(layout="llava-hf" if ov else "oryx-vit", text_config=dict(text),
                       vision=vision,
                       projector=ProjectorConfig(input_size=vision.hidden_size,
                                                 hidden_size=text["hidden_size"], image_newline=ov),
                       preprocess=PreprocessConfig(image_size=S),
                       prompt=PromptConfig(), family=family, recipes=recipes, image=image)


def photo(dst: Path) -> tuple[Path, Path]:
    """A 1920x1080 JPEG and a one-frame lossless video of the same (decoded) pixels."""
    import numpy as np
    from PIL import Image

    from sfllava_convert.tiny.pictures import picture_array
    from sfllava_convert.tiny.videos import write_video

    jpeg = dst / "photo.jpg"
    Image.fromarray(picture_array(1920, 1080, seed=7)).save(jpeg, "JPEG", quality=90)
    rgb = np.asarray(Image.open(jpeg).convert("RGB"))
    return jpeg, write_video(dst / "photo.mkv", [rgb], fps=25.0)


def ttft(engine, path) -> tuple[float, int, dict]:
    """From the open (the picture's content says picture, the .mkv's video) to the first token."""
    session = engine.open(path, cache=False, max_tokens=1)
    for _ in session.ask("What is in this picture?"):
        pass
    turn = session.last_turn
    return turn.timings_s["ttft"], int(session.visual.embeddings.shape[0]), dict(turn.timings_s)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--families", default="sf-llava-1.5,llava-onevision")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args()

    import mlx.core as mx

    from sfllava_app.bench.random_weights import build_random, random_tokenizer
    from sfllava_mlx import Engine

    tokenizer = random_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jpeg, video = photo(Path(tmp))
        for size in opts.sizes.split(","):
            for family in opts.families.split(","):
                model = build_random(config(family, size), mx.float32, label=f"{family} {size}")
                engine = Engine(model, tokenizer)
                row = {"size": size, "family": family, "image_mode": model.config.image.mode}
                media_paths = (("image", jpeg), ("video", video))
                for _ in range(opts.warmup):
                    for _media, path in media_paths:
                        ttft(engine, path)
                timed = {"image": [], "video": []}
                for _ in range(opts.runs):  # alternating: a load that drifts hits both alike
                    for media, path in media_paths:
                        timed[media].append(ttft(engine, path))
                        print(f"{size} {family} {media}: ttft {timed[media][-1][0]:.3f} s",
                              file=sys.stderr, flush=True)
                for media, _ in media_paths:
                    runs = timed[media]
                    row[f"{media}_tokens"] = runs[0][1]
                    row[f"{media}_ttft_s"] = round(statistics.median(r[0] for r in runs), 4)
                    row[f"{media}_timings_s"] = {k: round(v, 4) for k, v in runs[-1][2].items()}
                row["token_ratio"] = round(row["video_tokens"] / row["image_tokens"], 2)
                row["ttft_ratio"] = round(row["video_ttft_s"] / row["image_ttft_s"], 2)
                rows.append(row)
                if not opts.json:
                    print(f"{size:4} {family:16} image ({row['image_mode']}) {row['image_tokens']:5} "
                          f"tokens {row['image_ttft_s']:7.3f} s | one-frame video "
                          f"{row['video_tokens']:5} tokens {row['video_ttft_s']:7.3f} s | video/image "
                          f"tokens x{row['token_ratio']}, ttft x{row['ttft_ratio']}", flush=True)
                del model
    if opts.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
