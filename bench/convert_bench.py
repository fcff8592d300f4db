"""Time `sfllava convert` on a checkpoint with real shapes and random weights.

Writes a random bfloat16 source checkpoint under --work (default /tmp, never the
repository), converts it with the real command line for each variant, and reports wall
time, the converter process's peak RSS and the converted size on disk. Everything it wrote
is deleted unless --keep. Shapes (--shapes):

- `sfllava-1.5b`: SF-LLaVA-1.5-1B (Qwen2.5-1.5B + Oryx-ViT + projector, ~4 GB, layout oryx-vit);
- `ov-7b`: llava-onevision-qwen2-7b-ov as transformers' `save_pretrained` writes it (layout
  llava-hf: Qwen2-7B, untied, + SigLIP so400m with 26 blocks + projector + image_newline,
  ~16 GB in shards), written tensor by tensor (never the whole model in memory).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python -m bench.convert_bench [--shapes ov-7b] [--variants bf16,q8,q4] [--keep]

--drop-source-tensors runs the converter with one change (docs/performance.md, "LLaVA-OneVision"):
once the lazy MLX weights are built, the source's per-file dicts of lazily loaded tensors
(`SourceCheckpoint._loaded`) are dropped, so a source tensor is freed as soon as the shard
that needs it is written, instead of every tensor read staying in memory to the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny import LLM, Files, Tower, write_source_checkpoint, write_tokenizer
from sfllava_convert.tiny.checkpoint import write_weights
from sfllava_convert.tiny.command import run_env, sfllava_command
from sfllava_convert.tiny.tensors import (
    SIGLIP_PREFIX,
    llm_shapes,
    make_tensor,
    siglip_shapes,
    write_json,
)

# SF-LLaVA-1.5-1B: Qwen2.5-1.5B, Oryx-ViT (design.md §5.2), mlp2x_gelu projector 1152 -> 1536.
SHAPES_1_5B = (LLM(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                   vocab_size=151936, tied=True),
               Tower(hidden=1152, layers=27, heads=16, mlp=4304, patch_size=16, image_size=384,
                     pos_grid=128))
# llava-onevision-qwen2-7b-ov (llava-hf): Qwen2-7B, SigLIP so400m (26 blocks stored, patch 14,
# 384 px), projector 1152 -> 3584 -> 3584, image_newline (3584,).
SHAPES_OV_7B = (LLM(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944,
                    vocab_size=152064, tied=False),
                Tower(hidden=1152, layers=26, heads=16, mlp=4304, patch_size=14, image_size=384,
                      pos_grid=27))
SHAPES = {"sfllava-1.5b": SHAPES_1_5B, "ov-7b": SHAPES_OV_7B}

VARIANTS = {
    "bf16": ["--dtype", "bfloat16"],
    "q8": ["--dtype", "bfloat16", "-q", "--q-bits", "8"],
    "q4": ["--dtype", "bfloat16", "-q", "--q-bits", "4"],
    "f32": ["--dtype", "float32"],  # what the CPU backend picks by default
}


def write_llava_hf_checkpoint(path: Path, llm: LLM, tower: Tower, *, dtype: str = "bfloat16",
                              shards: int = 4, seed: int = 0, std: float = 0.02) -> Path:
    """A LlavaOnevisionForConditionalGeneration checkpoint with the names transformers 5's
    save_pretrained writes (`language_model.model.*`, `language_model.lm_head.weight`,
    `multi_modal_projector.linear_{1,2}.*`, `vision_tower.{embeddings,encoder,post_layernorm}.*`,
    `image_newline`), random weights, one tensor in memory at a time."""
    path.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(path)
    hidden, vision_hidden = llm.hidden, tower.hidden
    names = {}
    for name, shape in llm_shapes(hidden=hidden, llm_layers=llm.layers, heads=llm.heads,
                                  kv_heads=llm.kv_heads, intermediate=llm.intermediate,
                                  vocab=llm.vocab_size, tied=llm.tied).items():
        names["language_model." + name] = shape  # model.* and lm_head.* under language_model.
    for name, shape in siglip_shapes(vision_hidden=vision_hidden, vision_layers=tower.layers,
                                     vision_mlp=tower.mlp, patch_size=tower.patch_size,
                                     pos_grid=tower.grid).items():
        names["vision_tower." + name[len(SIGLIP_PREFIX):]] = shape
    for i, (out_dim, in_dim) in ((1, (hidden, vision_hidden)), (2, (hidden, hidden))):
        names[f"multi_modal_projector.linear_{i}.weight"] = (out_dim, in_dim)
        names[f"multi_modal_projector.linear_{i}.bias"] = (out_dim,)
    names["image_newline"] = (hidden,)
    write_weights(path, names, lambda name, shape: make_tensor(seed, name, shape, std), dtype,
                  shards)
    ids = {t: n_tok - 3 + i for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))}
    text = {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": llm.intermediate,
            "num_hidden_layers": llm.layers, "num_attention_heads": llm.heads,
            "num_key_value_heads": llm.kv_heads, "vocab_size": llm.vocab_size, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "tie_word_embeddings": llm.tied,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    vision = {"model_type": "siglip_vision_model", "hidden_size": vision_hidden,
              "intermediate_size": tower.mlp, "num_hidden_layers": tower.layers,
              "num_attention_heads": tower.heads, "image_size": tower.image_size,
              "patch_size": tower.patch_size, "hidden_act": "gelu_pytorch_tanh",
              "layer_norm_eps": 1e-6, "vision_use_head": False}
    write_json(path / "config.json", {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision", "dtype": dtype, "text_config": text,
        "vision_config": vision, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
        "image_token_index": n_tok, "video_token_index": n_tok + 1,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": llm.tied, "use_image_newline_parameter": True})
    write_json(path / "preprocessor_config.json", {
        "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
        "size": {"height": tower.image_size, "width": tower.image_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3})
    return path


# `sfllava convert`, except that SourceCheckpoint._loaded is cleared after _build_weights.
DROP_SOURCE_TENSORS = """
import sfllava_mlx.checkpoints.convert as c
_build = c._build_weights
def _build_and_drop(src, p, dtype):
    out = _build(src, p, dtype)
    src._loaded.clear()
    return out
c._build_weights = _build_and_drop
from sfllava_app.cli import entry
entry()
"""


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
    ap.add_argument("--shapes", choices=list(SHAPES), default="sfllava-1.5b",
                    help="the source checkpoint's model and layout")
    ap.add_argument("--variants", default="bf16,q8,q4", help=f"comma list of {','.join(VARIANTS)}")
    ap.add_argument("--shards", type=int, default=None,
                    help="source safetensors shards (default: 2, or 4 for ov-7b)")
    ap.add_argument("--llm-layers", type=int, default=None, help="fewer LLM layers (a quick check)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--drop-source-tensors", action="store_true",
                    help="convert with the source's loaded tensors dropped once the lazy weights "
                         "are built (the streaming fix this bench measures)")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="sfllava-convert-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    llm, tower = SHAPES[args.shapes]
    shards = args.shards or (4 if args.shapes == "ov-7b" else 2)
    if args.llm_layers:
        llm = dataclasses.replace(llm, layers=args.llm_layers)
    env = run_env(work)
    sfllava = sfllava_command([])
    if args.drop_source_tensors:
        sfllava = [sys.executable, "-c", DROP_SOURCE_TENSORS]
    # GNU time prints the child's peak RSS (KB) as the last line of stderr
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []

    try:
        src = work / "src"
        t = time.perf_counter()
        if args.shapes == "ov-7b":
            write_llava_hf_checkpoint(src, llm, tower, dtype="bfloat16", shards=shards, seed=0)
        else:
            write_source_checkpoint(src, "oryx-vit", llm=llm, tower=tower, seed=0,
                                    files=Files(dtype="bfloat16", shards=shards))
        print(f"source checkpoint ({args.shapes}): {dir_size(src) / 1e9:.2f} GB bfloat16 in "
              f"{shards} shards, written in {time.perf_counter() - t:.0f} s", flush=True)

        rows = []
        for name in args.variants.split(","):
            dst = work / f"mlx-{name}"
            cmd = timer + sfllava + ["convert", "--hf-path", str(src), "--mlx-path", str(dst),
                                     "--force", *VARIANTS[name]]
            wall, rc, output = run_measured(cmd, env)
            last = output.strip().splitlines()[-1] if output.strip() else ""
            peak_kb = int(last) if timer and last.isdigit() else 0  # time -f %M: KB
            if rc != 0:  # e.g. killed for memory: the peak it reached still tells why
                print(output[-4000:])
                print(f"{name}: sfllava convert failed (exit status {rc}) after {wall:.1f} s, "
                      f"peak RSS {peak_kb / 2**20:.2f} GiB", flush=True)
                rows.append((name, wall, peak_kb * 1024, None))
                shutil.rmtree(dst, ignore_errors=True)
                continue
            rows.append((name, wall, peak_kb * 1024, dir_size(dst)))
            print(f"{name}: {wall:.1f} s, peak RSS {peak_kb / 2**20:.2f} GiB, "
                  f"{dir_size(dst) / 1e9:.2f} GB on disk", flush=True)
            shutil.rmtree(dst)

        print("\n| variant | wall (s) | peak RSS (GiB) | size on disk (GB) |")
        print("|---|---|---|---|")
        for name, wall, rss, size in rows:
            on_disk = f"{size / 1e9:.2f}" if size is not None else "failed"
            print(f"| {name} ({' '.join(VARIANTS[name])}) | {wall:.1f} | {rss / 2**30:.2f} | {on_disk} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
