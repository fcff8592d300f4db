"""sfllava against mlx-vlm on one LLaVA-OneVision checkpoint, the same frames, side by side.

Writes a LLaVA-OneVision source checkpoint with transformers (`LlavaOnevisionConfig` at the
shapes of llava-onevision-qwen2-0.5b-ov, random weights, float32 `save_pretrained`: the
llava-hf layout that both projects read), converts it with `sfllava convert`, decodes the
video's frames ONCE (sfllava's reader, LLaVA-OneVision's 32 linspace positions) and hands
the same uint8 frames to both:

- ours: `sfllava_mlx.load` + `encode_video` + `Conversation.ask` (the runtime API), run with
  this repository's .venv;
- theirs: `mlx_vlm.load` + `mlx_vlm.stream_generate(..., video=[frames])` (its own processor
  normalises the frames, its own prompt expansion and `<video>` splice), run with
  .venv-vlm, where mlx-vlm lives (it is never a dependency of sfllava):

      python3 -m venv .venv-vlm && .venv-vlm/bin/pip install "mlx-vlm==0.7.10" "mlx[cpu]==0.32.4"

Each side runs in its own process, one after the other (the machine has 2 cores), after a
short warm-up in the same process (`--warmup-frames` frames, 2 tokens). Measured per side:
time to first token (wall clock from the request, with the decoded frames in memory, to
the first token: preprocessing + vision tower + projector + pooling + prefill) and decode
tokens/s (tokens after the first over the time after the first), greedy. The greedy tokens
are compared. The frames are 384 x 384 (the tower's size), so neither side resizes: both
see identical pixels up to float rounding of (x/255 - 0.5)/0.5.

The random LLM emits ids past the small test tokenizer's vocabulary; both sides decode text
with the naive streaming detokenizer (the BPE one indexes a table of the tokenizer's size).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        .venv/bin/python -m bench.mlx_vlm_bench [--frames 32] [--max-tokens 32] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
QUESTION = "What happens in this video? Describe it in detail."
SYSTEM = "You are a helpful assistant."
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"

# llava-onevision-qwen2-0.5b-ov (llava-hf): Qwen2-0.5B + SigLIP so400m with 26 blocks stored.
SHAPES_0_5B = dict(
    text=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0,
              max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                num_attention_heads=16, image_size=384, patch_size=14,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
)
# --tiny: the same code paths in seconds (a check of the script, not a measurement).
SHAPES_TINY = dict(
    text=dict(SHAPES_0_5B["text"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, vocab_size=1024),
    vision=dict(SHAPES_0_5B["vision"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2),
)


# ---------------------------------------------------------------------------------------
# The checkpoint (run in .venv: transformers + torch)


def write_checkpoint(path: Path, shapes: dict, seed: int = 0) -> Path:
    """transformers' LlavaOnevisionForConditionalGeneration, random init (std 0.02), saved in
    float32 (mlx-vlm keeps a checkpoint's dtype; bfloat16 has no fast CPU path), with the
    small test tokenizer plus <image>/<video> and the processor files mlx-vlm reads."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    from sfllava_convert.tiny import write_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>",
                                                          IMAGE_TOKEN, VIDEO_TOKEN]})
    tok.save_pretrained(path)
    image_id, video_id = tok.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])

    text = dict(shapes["text"], model_type="qwen2")
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=dict(shapes["vision"], model_type="siglip_vision_model"),
        image_token_index=image_id, video_token_index=video_id, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(seed)
    with torch.no_grad():
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32)
        # SigLIP's position table starts at zero in some inits: give it values too
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "position_embedding" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    del model

    size = shapes["vision"]["image_size"]
    pinpoints = [[size * i, size * j] for i in range(1, 7) for j in range(1, 7)]
    _write_json(path / "preprocessor_config.json", {  # as llava-hf's OneVision repos hold it
        "image_processor_type": "LlavaOnevisionImageProcessor", "do_resize": True,
        "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_pad": True, "do_convert_rgb": True,
        "image_grid_pinpoints": pinpoints, "processor_class": "LlavaOnevisionProcessor"})
    _write_json(path / "video_preprocessor_config.json", {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "do_resize": True,
        "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_convert_rgb": True})
    n_video = (size // shapes["vision"]["patch_size"]) ** 2
    _write_json(path / "processor_config.json", {
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": n_video,
        "vision_feature_select_strategy": "full", "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN})
    return path


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def decode_frames(video: Path, num_frames: int, out: Path) -> dict:
    """The frames both sides see, decoded once by sfllava's reader at LLaVA-OneVision's
    positions (numpy.linspace, truncated), saved as one uint8 array."""
    import numpy as np

    from sfllava_mlx.frames import read_frames

    clip = read_frames(str(video), num_frames=num_frames, slow_every=1, positions="linspace")
    np.save(out, np.stack(clip.images))
    return {"indices": clip.indices, "shape": list(np.stack(clip.images).shape)}


# ---------------------------------------------------------------------------------------
# One side (run in its own process)


def prompt_text(placeholder: str) -> str:
    from sfllava_mlx.prompt import first_turn

    before, after = first_turn(SYSTEM, QUESTION)
    return before + placeholder + after


def side_ours(model_dir: str, frames, max_tokens: int, warmup_frames: int) -> dict:
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer

    from sfllava_mlx import load
    from sfllava_mlx.conversation import Conversation
    from sfllava_mlx.encode import encode_video
    from sfllava_mlx.frames import SampledFrames, stream_names

    model, tokenizer = load(model_dir)
    tokenizer._detokenizer = NaiveStreamingDetokenizer(tokenizer._tokenizer)

    def run(images, n_tokens):
        n = len(images)
        sampling = model.config.recipe("native", num_frames=n)
        mx.clear_cache()
        mx.reset_peak_memory()
        clip = SampledFrames(list(images), list(range(n)), [0.0] * n,
                             stream_names(n, sampling.slow_every), True, [], None)
        start = Clock()
        visual = encode_video(model, clip, sampling)
        conv = Conversation(model, tokenizer, visual, system_prompt=SYSTEM)
        ids = (conv.prefix_tokens() + [-1] * int(visual.embeddings.shape[0])
               + conv.question_tokens(QUESTION))
        stamps, tokens, first = [], [], None
        for r in conv.ask(QUESTION, max_tokens=n_tokens, temp=0.0, start_time=start.wall):
            if r.finish_reason == "stop":
                break
            stamps.append(Clock())
            tokens.append(int(r.token))
            if len(tokens) == 1:
                first = top_logprobs(r.logprobs)
        t = conv.last_turn.timings_s
        return result(start, stamps, tokens, {"vision": t["vision"], "prefill": t["prefill"]},
                      ids, int(visual.embeddings.shape[0]), first=first)

    run(frames[:warmup_frames], 2)
    return run(frames, max_tokens)


def side_theirs(model_dir: str, frames, max_tokens: int, warmup_frames: int) -> dict:
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load, stream_generate
    from mlx_vlm.tokenizer_utils import NaiveStreamingDetokenizer

    model, processor = load(model_dir)
    processor.detokenizer = NaiveStreamingDetokenizer(processor.tokenizer)
    video_id = model.config.video_token_index
    prompt = prompt_text(VIDEO_TOKEN)

    def run(images, n_tokens):
        mx.clear_cache()
        mx.reset_peak_memory()
        start = Clock()
        stamps, tokens, first = [], [], None
        for r in stream_generate(model, processor, prompt, video=[images], max_tokens=n_tokens,
                                 temperature=0.0):
            if r.token is None or r.finish_reason == "stop":
                break
            if len(tokens) == r.generation_tokens:  # the final response repeats the last token
                continue
            stamps.append(Clock())
            tokens.append(int(r.token))
            if len(tokens) == 1:
                first = top_logprobs(r.logprobs)
        # the ids it built, to check that both sides fed the LLM the same sequence
        ids = mlx_vlm.utils.prepare_inputs(processor, videos=[images[:1]], prompts=prompt,
                                           image_token_index=model.config.image_token_index)
        ids = [(-1 if i == video_id else i) for i in ids["input_ids"].flatten().tolist()]
        n_visual = int(images.shape[0]) * (ids.count(-1) - 1) + 1  # 1 frame's tokens, scaled
        return result(start, stamps, tokens, {}, None, n_visual, ids, first=first)

    run(frames[:warmup_frames], 2)
    return run(frames, max_tokens)


class Clock:
    """Wall time, this process's CPU time (user + system, all threads) and the load average:
    the CPU time of a compute-bound stage moves less than its wall time when other jobs
    share the machine."""

    def __init__(self):
        self.wall, self.cpu, self.load = time.perf_counter(), time.process_time(), os.getloadavg()[0]


def top_logprobs(logprobs, k: int = 10) -> dict:
    """{token id: log-probability} of the k likeliest first tokens."""
    import numpy as np

    lp = np.array(logprobs, dtype=np.float64).reshape(-1)
    top = np.argsort(-lp)[:k]
    return {int(i): float(lp[i]) for i in top}


def result(start, stamps, tokens, stages, ids, n_visual, one_frame_ids=None, first=None) -> dict:
    import mlx.core as mx

    n = len(tokens)
    return {"ttft_s": stamps[0].wall - start.wall,
            "decode_tok_s": (n - 1) / (stamps[-1].wall - stamps[0].wall) if n > 1 else None,
            "ttft_cpu_s": stamps[0].cpu - start.cpu,
            "decode_tok_per_cpu_s": (n - 1) / (stamps[-1].cpu - stamps[0].cpu) if n > 1 else None,
            "load_average": [start.load, stamps[0].load, stamps[-1].load],
            "tokens": tokens, "stages_s": stages, "visual_tokens": n_visual,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "prompt_ids": ids,
            "first_token_top_logprobs": first,
            "one_frame_prompt_ids": one_frame_ids}


def run_side(args) -> int:
    import numpy as np

    frames = np.load(args.frames_file)
    fn = side_ours if args.side == "ours" else side_theirs
    out = fn(args.model, frames, args.max_tokens, args.warmup_frames)
    import mlx.core as mx

    out["versions"] = {"mlx": mx.__version__}
    if args.side == "theirs":
        import mlx_vlm

        out["versions"]["mlx_vlm"] = getattr(mlx_vlm, "__version__", "?")
    else:
        import mlx_lm

        out["versions"]["mlx_lm"] = mlx_lm.__version__
    Path(args.out).write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------
# The comparison (run in .venv)


def same_sequence(ours: dict, theirs: dict) -> bool:
    """Their one-frame prompt, its video run widened to our visual token count, equals ours."""
    ids, o = theirs["one_frame_prompt_ids"], ours["prompt_ids"]
    first = ids.index(-1)
    text_before, text_after = ids[:first], [i for i in ids[first:] if i != -1]
    return o == text_before + [-1] * ours["visual_tokens"] + text_after


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--frames-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=32, help="frames (LLaVA-OneVision: 32)")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per side")
    ap.add_argument("--warmup-frames", type=int, default=2, help="frames of each side's warm-up")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: check the script in seconds")
    ap.add_argument("--order", default="ours,theirs", help="which side runs first")
    ap.add_argument("--vlm-python", default=str(REPO / ".venv-vlm" / "bin" / "python"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.side:
        return run_side(args)

    if not Path(args.vlm_python).exists():
        raise SystemExit(f"{args.vlm_python} not found: make the mlx-vlm venv first (see --help)")
    work = Path(args.work or tempfile.mkdtemp(prefix="sfllava-vlm-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if Path(OPENBLAS).exists():
        env["LD_PRELOAD"] = OPENBLAS
    shapes = SHAPES_TINY if args.tiny else SHAPES_0_5B
    try:
        t = time.perf_counter()
        src = write_checkpoint(work / "hf", shapes)
        print(f"source checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from sfllava_app.cli import entry; entry()", "convert",
                        "--hf-path", str(src), "--mlx-path", str(work / "mlx"), "--force",
                        "--dtype", "float32"], env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"converted in {time.perf_counter() - t:.0f} s", flush=True)
        from sfllava_app.bench import make_video

        size = shapes["vision"]["image_size"]
        video = make_video(work / "clip.mp4", seconds=10, width=size, height=size)
        frames = decode_frames(video, args.frames, work / "frames.npy")
        print(f"frames {frames['shape']} at {frames['indices']}", flush=True)

        results = {}
        for side in args.order.split(","):
            python = sys.executable if side == "ours" else args.vlm_python
            model = work / ("mlx" if side == "ours" else "hf")
            out = work / f"{side}.json"
            t = time.perf_counter()
            p = subprocess.run([python, __file__, "--side", side, "--model", str(model),
                                "--frames-file", str(work / "frames.npy"), "--out", str(out),
                                "--max-tokens", str(args.max_tokens),
                                "--warmup-frames", str(args.warmup_frames)], env=env)
            if p.returncode:
                raise SystemExit(f"{side}: exit status {p.returncode}")
            results[side] = json.loads(out.read_text())
            print(f"{side}: done in {time.perf_counter() - t:.0f} s (with load and warm-up)",
                  flush=True)
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(r: dict, args) -> None:
    ours, theirs = r["ours"], r["theirs"]
    agree = 0
    for a, b in zip(ours["tokens"], theirs["tokens"]):
        if a != b:
            break
        agree += 1
    n = max(len(ours["tokens"]), len(theirs["tokens"]))
    print(f"\nframes {args.frames}, visual tokens ours {ours['visual_tokens']} / theirs "
          f"{theirs['visual_tokens']}; same LLM input sequence: {same_sequence(ours, theirs)}")
    print(f"versions: ours {ours['versions']}, theirs {theirs['versions']}")
    print("\n| | sfllava | mlx-vlm | ours / theirs |\n|---|---|---|---|")
    print(f"| time to first token (s) | {ours['ttft_s']:.1f} | {theirs['ttft_s']:.1f} | "
          f"{ours['ttft_s'] / theirs['ttft_s']:.2f}x |")
    if ours["decode_tok_s"] and theirs["decode_tok_s"]:
        print(f"| decode (tokens/s) | {ours['decode_tok_s']:.2f} | {theirs['decode_tok_s']:.2f} | "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x |")
    if ours.get("ttft_cpu_s") and theirs.get("ttft_cpu_s"):
        print(f"| time to first token, CPU time (s) | {ours['ttft_cpu_s']:.1f} | "
              f"{theirs['ttft_cpu_s']:.1f} | {ours['ttft_cpu_s'] / theirs['ttft_cpu_s']:.2f}x |")
    if ours.get("decode_tok_per_cpu_s") and theirs.get("decode_tok_per_cpu_s"):
        print(f"| decode (tokens per CPU second) | {ours['decode_tok_per_cpu_s']:.2f} | "
              f"{theirs['decode_tok_per_cpu_s']:.2f} | "
              f"{ours['decode_tok_per_cpu_s'] / theirs['decode_tok_per_cpu_s']:.2f}x |")
    print(f"| load average (start, first token, last token) | "
          f"{', '.join(f'{x:.1f}' for x in ours.get('load_average', []))} | "
          f"{', '.join(f'{x:.1f}' for x in theirs.get('load_average', []))} | |")
    print(f"| peak MLX memory (GB) | {ours['peak_memory_gb']:.2f} | {theirs['peak_memory_gb']:.2f} | |")
    print(f"\nours: vision {ours['stages_s'].get('vision', 0):.1f} s, prefill "
          f"{ours['stages_s'].get('prefill', 0):.1f} s")
    print(f"greedy tokens: {agree}/{n} equal from the start "
          f"({'identical' if ours['tokens'] == theirs['tokens'] else 'differ'})")
    print(f"ours:   {ours['tokens']}\ntheirs: {theirs['tokens']}")
    a, b = ours.get("first_token_top_logprobs"), theirs.get("first_token_top_logprobs")
    if a and b:
        # json keys are strings; the top 10 of either side, looked up on both
        shared = [k for k in a if k in b]
        diff = max((abs(a[k] - b[k]) for k in shared), default=float("nan"))
        print(f"first token: top-10 ids {'identical' if list(a) == list(b) else 'differ'}; "
              f"largest log-probability difference over the {len(shared)} shared: {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
