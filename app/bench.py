"""`sfllava bench`: where the time goes, and how far each stage is from the machine's limit.

    sfllava bench --random-weights 1.5b [--frames 32,64,128] [-q] [--q-bits 4,8] [--runs 3]
    sfllava bench --random-weights ov-0.5b --recipe native,slowfast
    sfllava bench --model DIR [--video FILE] [--json]
    sfllava bench --sizes 1.5b,3b,7b --q-bits 4

The whole pipeline runs `--warmup` times, then `--runs` times, on a video (the given file,
or a generated one). Each stage is the runtime's own critical-path share: frame decode
(the time the tower waited for the decoder thread), preprocessing, vision tower,
projector + pooling, prefill, time to first token, decode tokens/s, a follow-up question's
time to first token, and a cached reopen (the video cache read back, then the first token).
The frame stages add up to what the runtime reports as `frames` + `vision`; with prefill
they add up to the time to first token.

Each configuration (model size x bits x recipe x frames) is one row, named by the model's
family and recipe: median, min and max per stage, peak memory split into weights, KV cache
and working sets, the work each stage does (FLOP or bytes per token, app/hardware.py:
the tower's FLOP per frame at the model's real grid, times the recipe's frames) and the
share of the machine's peak that the measurement reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from sfllava_mlx.errors import UserError

from . import hardware

SCHEMA = "sfllava-bench/1"
PROMPT = "What happens in this video? Describe it in detail."
FOLLOWUP = "What color is the car?"

# (key, label, unit): the report's stages in pipeline order.
STAGES = [
    ("frame_decode", "frame decode", "s"),
    ("preprocess", "preprocess", "s"),
    ("vision_tower", "vision tower", "s"),
    ("projector_pooling", "projector+pool", "s"),
    ("prefill", "prefill", "s"),
    ("overlap", "vision ‖ prefill", "s"),  # both units busy (Core ML tower beside MLX)
    ("ttft", "TTFT", "s"),
    ("decode", "decode", "tok/s"),
    ("followup_ttft", "follow-up TTFT", "s"),
    ("cached_reopen", "cached reopen TTFT", "s"),
]
STAGE_KEYS = [k for k, _, _ in STAGES]


# ---------------------------------------------------------------------------------------
# Arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="converted model directory or hub repo id")
    from sfllava_mlx.random_weights import SIZES

    src.add_argument("--random-weights", choices=SIZES,
                     help="a model's exact shapes with random weights (no download): SF-LLaVA-1.5 "
                          "1.5b/3b/7b, LLaVA-OneVision ov-0.5b/ov-7b (llava-onevision-qwen2-*-ov)")
    src.add_argument("--sizes", type=_list(str), metavar="1.5b,ov-0.5b,...",
                     help="sweep random-weight model sizes")
    p.add_argument("--video", help="video to profile on (default: a generated 10 s clip)")
    p.add_argument("--recipe", type=_list(str), metavar="native,slowfast",
                   help="frame recipes, a sweep when several (default: native): the model's own, "
                        "or SlowFast (32 slow + 96 fast frames)")
    p.add_argument("--frames", type=_list(int), metavar="N[,N...]",
                   help="sample positions per video, a sweep when several (default: the recipe's)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="compute dtype (default: float32 on MLX's CPU backend, else float16 for "
                        "random weights, the model's own for --model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the LLM (4 bits)")
    p.add_argument("--q-bits", type=_list(_bits), metavar="4,8",
                   help="LLM weight bits, a sweep when several ('none' = not quantized)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size")
    p.add_argument("--runs", type=int, default=3, help="measured runs per configuration")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per answer")
    p.add_argument("--prompt", default=PROMPT, help="the first question")
    p.add_argument("--followup", default=FOLLOWUP, help="the follow-up question")
    p.add_argument("--seek", choices=["exact", "keyframe"], default="exact")
    p.add_argument("--vision-backend", type=_list(str), default=["mlx"],
                   metavar="mlx,coreml[:UNITS]",
                   help="vision tower backends, a sweep when several; coreml (macOS) takes "
                        "compute units ALL, CPU_AND_NE or CPU_AND_GPU, e.g. coreml:CPU_AND_NE")
    p.add_argument("--kv-bits", type=int, choices=[4, 8], default=None, help="quantize the KV cache")
    p.add_argument("--no-reopen", action="store_true",
                   help="skip the cached-reopen stage (it writes the video cache to a temp dir)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the machine's dense matmul peak, TFLOPS (default: the detected chip's)")
    p.add_argument("--peak-bandwidth-gbs", type=float, default=None,
                   help="the machine's memory bandwidth, GB/s (default: the detected chip's)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure MLX's matmul and bandwidth here and use them as the peak")
    p.add_argument("--json", action="store_true", help="print one JSON object (stdout: only JSON)")


def _list(kind):
    def parse(text: str):
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _bits(text: str) -> Optional[int]:
    if text.lower() in ("none", "0", "16", "no"):
        return None
    return int(text)


@dataclass
class Config:
    """One row of the report."""

    model: str  # "random:1.5b" or the --model argument
    size: Optional[str]
    dtype: Optional[str]
    q_bits: Optional[int]
    num_frames: Optional[int]
    backend: str = "mlx"  # "mlx" or "coreml:UNITS"
    recipe: str = "native"
    family: Optional[str] = None  # the model's (known once it is built)

    def label(self) -> str:
        from sfllava_mlx.random_weights import display_name

        name = f"{display_name(self.size)} (random weights)" if self.size else self.model
        if self.family and not self.size:
            name = f"{name} [{self.family}]"
        bits = f"{self.q_bits}-bit LLM" if self.q_bits else "unquantized"
        return (f"{name}, {self.dtype}, {bits}, recipe {self.recipe}, {self.num_frames} frames, "
                f"vision {self.backend}")


def configurations(args) -> list[Config]:
    if not (args.model or args.random_weights or args.sizes):
        raise UserError("bench needs --model DIR, --random-weights SIZE or --sizes")
    for name in ("runs", "max_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must be 0 or more")
    hardware.require_positive("--peak-tflops", args.peak_tflops)
    hardware.require_positive("--peak-bandwidth-gbs", args.peak_bandwidth_gbs)
    sizes = args.sizes or ([args.random_weights] if args.random_weights else [None])
    from sfllava_mlx.random_weights import SIZES

    for s in sizes:
        if s is not None and s not in SIZES:
            raise UserError(f"unknown size {s!r} in --sizes: choose from {', '.join(SIZES)}")
    bits = args.q_bits or [4 if args.quantize else None]
    for b in bits:
        if b is not None and b not in (2, 3, 4, 5, 6, 8):
            raise UserError(f"--q-bits {b}: MLX quantizes to 2, 3, 4, 5, 6 or 8 bits")
    frames = args.frames or [None]
    for f in frames:
        if f is not None and f < 1:
            raise UserError(f"--frames {f}: need at least one frame")
    recipes = args.recipe or ["native"]
    from sfllava_mlx.config import RECIPES

    for r in recipes:
        if r not in RECIPES:
            raise UserError(f"--recipe {r}: choose from {', '.join(RECIPES)}")
    backends = [parse_backend(b) for b in args.vision_backend]
    model = args.model or "random"
    return [Config(model if s is None else f"random:{s}", s, args.dtype, b, f, v, r)
            for s in sizes for b in bits for r in recipes for f in frames for v in backends]


def parse_backend(text: str) -> str:
    from sfllava_mlx.coreml_vision import COMPUTE_UNITS, require_macos

    name, _, units = text.partition(":")
    if name == "mlx" and not units:
        return "mlx"
    if name == "coreml" and (units or "ALL") in COMPUTE_UNITS:
        require_macos()  # before any model is built
        return f"coreml:{units or 'ALL'}"
    raise UserError(f"--vision-backend {text}: use mlx or coreml[:{'|'.join(COMPUTE_UNITS)}]")


def backend_options(opts, backend: str):
    """opts with --vision-backend/--compute-units set for one configuration."""
    name, _, units = backend.partition(":")
    return argparse.Namespace(**{**vars(opts), "vision_backend": name,
                                 "compute_units": units or "ALL"})


# ---------------------------------------------------------------------------------------
# Models


def context_tokens(config, rows: list[Config]) -> int:
    """The longest video the rows will prefill, plus 512 tokens: what the KV cache must hold."""
    from sfllava_mlx.pooling import num_visual_tokens

    longest = 0
    for row in rows:
        recipe = config.recipes[row.recipe]
        sampling = replace(recipe, num_frames=row.num_frames or recipe.num_frames)
        longest = max(longest, num_visual_tokens(config.vision.grid, sampling))
    return longest + 512


def build_model(cfg: Config, args, rows: Optional[list] = None):
    """(model, tokenizer) for a configuration; the machine is checked before allocating,
    for the longest video of `rows` (the configurations that will share the model)."""
    import mlx.core as mx

    from sfllava_mlx import random_weights as rw

    rows = rows or [cfg]
    if cfg.size:
        dtype = rw.as_dtype(cfg.dtype)
        model, tokenizer = rw.random_model(
            cfg.size, dtype, q_bits=cfg.q_bits, q_group_size=args.q_group_size,
            context_tokens=context_tokens(rw.model_config(cfg.size), rows))
    else:
        from sfllava_mlx.model import default_dtype, load

        dtype = rw.as_dtype(cfg.dtype) if cfg.dtype else default_dtype()
        model, tokenizer = load(cfg.model, dtype=dtype, lazy=True)
        if cfg.q_bits:
            if model.config.quantization:
                raise UserError(f"{cfg.model} is already quantized "
                                f"({model.config.quantization.get('bits')} bits): drop --q-bits")
            rw.quantize_language_model(model, cfg.q_bits, args.q_group_size)
        tokens = context_tokens(model.config, rows)
        rw.check_fits(rw.estimate_memory(model, tokens), str(cfg.model))
        mx.eval(model.parameters())
    cfg.dtype = rw.dtype_name(model.language_model.model.norm.weight.dtype)
    if cfg.q_bits is None and model.config.quantization:
        cfg.q_bits = model.config.quantization.get("bits")
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# One run of the pipeline


class TimedTower:
    """The vision tower, timed: the normalised pixels are evaluated first (preprocessing),
    then the tower alone. Called by the runtime's encode_frames as its `vision`."""

    def __init__(self, tower):
        self.tower = tower
        self.pixels_s = self.tower_s = 0.0

    def __call__(self, pixels):
        import mlx.core as mx

        tic = time.perf_counter()
        mx.eval(pixels)
        mid = time.perf_counter()
        out = self.tower(pixels)
        mx.eval(out)
        self.pixels_s += mid - tic
        self.tower_s += time.perf_counter() - mid
        return out


def encode_timed(model, path, opts):
    """The runtime's streaming encode (runner.encode_streaming) with the tower timed on its
    own -> (VisualTokens, split timings)."""
    from . import runner

    tower = TimedTower(runner.vision_backend(model, opts) or model.vision_tower)
    visual = runner.encode_streaming(model, path, opts, vision=tower)
    t = visual.timings
    split = {
        # `frames` = opening the video + waiting for decoded frames + preprocessing
        "frame_decode": t["frames"] - t["preprocess"],
        "preprocess": t["preprocess"] + tower.pixels_s,
        "vision_tower": tower.tower_s,
        "projector_pooling": t["vision"] - tower.pixels_s - tower.tower_s,
    }
    return visual, split


def _drain(responses) -> None:
    for _ in responses:
        pass


def _peak() -> int:
    import mlx.core as mx

    return mx.get_peak_memory()


def _reset_peak() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


@dataclass
class Run:
    stages: dict  # stage -> seconds (tokens/s for decode), None when not measured
    memory: dict  # bytes
    counts: dict  # tokens: prompt, generated, follow-up, visual
    pipeline: dict  # the runtime's own timings of the first turn
    notes: list = field(default_factory=list)


def encode_overlapped(model, tokenizer, path, opts):
    """The Core ML path as `generate` runs it: the tower encodes beside MLX, which prefills
    the slow tokens while the fast frames encode -> (conversation, split timings)."""
    from . import runner

    tower = runner.vision_backend(model, opts)
    clip = runner.sample_video(model, path, opts)
    conv = runner.new_conversation(model, tokenizer, None, opts)
    t = conv.prefill_overlapped(clip, tower).timings
    split = {"frame_decode": t["frames"], "preprocess": 0.0,  # preprocessing rides with the tower
             "vision_tower": t["vision"], "projector_pooling": 0.0, "overlap": t["overlap"]}
    return conv, split


def run_once(model, tokenizer, path, opts, store=None) -> Run:
    from . import runner

    import mlx.core as mx

    ask = dict(max_tokens=opts.max_tokens, temp=0.0)
    mx.clear_cache()
    _reset_peak()
    start = time.perf_counter()
    if opts.vision_backend == "coreml":
        conv, split = encode_overlapped(model, tokenizer, path, opts)
        visual = conv.visual
    else:
        visual, split = encode_timed(model, path, opts)
        split["overlap"] = 0.0
        conv = runner.new_conversation(model, tokenizer, visual, opts)
    peak_vision = _peak()
    _reset_peak()
    _drain(conv.ask(opts.prompt, start_time=start, **ask))
    first = conv.last_turn
    peak_llm = _peak()
    kv = sum(c.nbytes for c in conv.cache)
    context = conv.offset
    _drain(conv.ask(opts.followup, **ask))
    follow = conv.last_turn
    t = first.timings_s
    generated = len(first.tokens)
    stages = {**split, "prefill": t["prefill"], "ttft": t["ttft"],
              "decode": (generated - 1) / t["generate"] if generated > 1 and t["generate"] else None,
              "followup_ttft": follow.timings_s["ttft"], "cached_reopen": None}
    notes = []
    if store is not None:
        try:
            prime_cache(model, visual, conv, path, opts, store)
            stages["cached_reopen"] = reopen(model, tokenizer, path, opts, store)
        except Exception as e:  # noqa: BLE001 - a cache problem must not lose the other stages
            notes.append(f"cached reopen not measured: {type(e).__name__}: {e}")
    else:
        notes.append("cached reopen not measured: --no-reopen")
    counts = {"visual": int(visual.embeddings.shape[0]), "prompt": first.prompt_tokens,
              "generated": generated, "followup_prompt": follow.prompt_tokens,
              "followup_offset": context, "context": conv.offset}
    memory = {"peak_vision": peak_vision, "peak_llm": peak_llm, "kv_cache": kv}
    return Run(stages, memory, counts, dict(t), notes)


def prime_cache(model, visual, conv, path, opts, store) -> None:
    """Store the run's visual tokens and prefilled prefix, as `chat` leaves them for the
    next session (once per configuration: the runtime's VideoCache keeps what it has)."""
    from sfllava_mlx import cache as vcache

    fingerprint = vcache.VideoFingerprint.of(path)
    key = vcache.make_key(fingerprint, model, seek=opts.seek,
                          vision_backend=getattr(opts, "vision_backend", "mlx"))
    entry = store.store(key, fingerprint, visual.embeddings, visual.clip, content_sha256=None,
                        model_name="bench")
    if entry is None:
        raise RuntimeError("the video cache did not keep the visual tokens")
    kv_key = vcache.prefix_key(conv.prefix_tokens(), kv_bits=opts.kv_bits)
    store.store_prefix(entry, kv_key, conv.cache, length=conv.prefix_length(),
                       system_prompt=conv.system_prompt)


def reopen(model, tokenizer, path, opts, store) -> float:
    """Seconds from reopening a cached video to the first token of a question."""
    from . import runner

    args = argparse.Namespace(**{**vars(opts), "no_cache": False})
    opened = runner.open_video(model, tokenizer, path, args, store=store)
    if opened.cache != "hit":
        raise RuntimeError(f"expected a cache hit, got {opened.cache!r}")
    _drain(opened.ask(opts.prompt, max_tokens=1, temp=0.0))
    return opened.conv.last_turn.timings_s["ttft"]


# ---------------------------------------------------------------------------------------
# Statistics, work and shares


def summarize(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def work_and_shares(model, runs: list[Run], stats: dict, peak: hardware.Peak,
                    kv_bits: Optional[int] = None) -> tuple[dict, dict]:
    """Per stage: the work it does (FLOP or bytes) and the share of the peak it reaches at
    its median time."""
    from sfllava_mlx.memory import kv_bytes_per_token
    from sfllava_mlx.memory import weight_bytes as parameter_bytes

    cfg = model.config
    tc = cfg.text_config
    c = runs[0].counts
    frames = cfg.sampling.num_frames
    flops_peak = peak.tflops * 1e12 if peak.tflops else None
    bw_peak = peak.bandwidth_gbs * 1e9 if peak.bandwidth_gbs else None
    llm = model.language_model
    weight_bytes = parameter_bytes(llm)
    untied = getattr(llm.args, "tie_word_embeddings", True) is False
    embed_bytes = parameter_bytes(llm.model.embed_tokens) if untied else 0
    kvpt = kv_bytes_per_token(cfg, llm.model.norm.weight.dtype.size, kv_bits)
    mean_context = c["prompt"] + c["generated"] / 2
    work = {
        "vision_tower": {"flops": frames * hardware.vision_flops_per_frame(cfg.vision)},
        "projector_pooling": {"flops": frames * hardware.projector_flops_per_frame(cfg.vision,
                                                                                   cfg.projector)
                              + hardware.pooling_flops(cfg.vision, cfg.projector.hidden_size,
                                                       cfg.sampling)},
        "prefill": {"flops": hardware.prefill_flops(tc, c["prompt"])},
        "decode": {"bytes_per_token": hardware.decode_bytes_per_token(
            tc, weight_bytes, kvpt, mean_context, embed_bytes), "mean_context": mean_context},
        "followup_ttft": {"bytes": hardware.decode_bytes_per_token(
            tc, weight_bytes, kvpt, c["followup_offset"] + c["followup_prompt"], embed_bytes),
            "flops": hardware.prefill_flops(tc, c["followup_prompt"], c["followup_offset"])},
    }
    med = {k: (v or {}).get("median") for k, v in stats.items()}
    shares = {
        "vision_tower": hardware.share(work["vision_tower"]["flops"], med["vision_tower"], flops_peak),
        "projector_pooling": hardware.share(work["projector_pooling"]["flops"],
                                            med["projector_pooling"], flops_peak),
        "prefill": hardware.share(work["prefill"]["flops"], med["prefill"], flops_peak),
        "decode": (hardware.share(work["decode"]["bytes_per_token"] * med["decode"], 1.0, bw_peak)
                   if med["decode"] else None),
        "followup_ttft": hardware.share(work["followup_ttft"]["bytes"], med["followup_ttft"], bw_peak),
    }
    return work, shares


def memory_report(model, runs: list[Run], max_tokens: int = 512, kv_bits=None) -> dict:
    """Peak memory split into weights, KV cache and the two working sets (GB), beside the
    memory plan's estimate (what `generate` checks before it starts)."""
    from sfllava_mlx.memory import plan_memory
    from sfllava_mlx.memory import weight_bytes as parameter_bytes

    plan = plan_memory(model, model.config.sampling, max_tokens=max_tokens, kv_bits=kv_bits)
    weights = parameter_bytes(model)
    peak_vision = max(r.memory["peak_vision"] for r in runs)
    peak_llm = max(r.memory["peak_llm"] for r in runs)
    kv = max(r.memory["kv_cache"] for r in runs)
    gb = lambda b: round(b / 1e9, 4)  # noqa: E731
    return {
        "peak": gb(max(peak_vision, peak_llm)),
        "weights": gb(weights),
        "kv_cache": gb(kv),
        "vision_working_set": gb(max(peak_vision - weights, 0)),
        "prefill_working_set": gb(max(peak_llm - weights - kv, 0)),
        "budget_weights_kv_plus_1gb": gb(weights + kv + 1e9),
        "plan_estimate": gb(plan.total),
    }


def bench_row(cfg: Config, model, tokenizer, path, args, peak, progress=None) -> dict:
    store = None
    notes = []
    tmp = None
    if not args.no_reopen:
        from sfllava_mlx.cache import VideoCache

        tmp = tempfile.TemporaryDirectory(prefix="sfllava-bench-cache-")
        store = VideoCache(Path(tmp.name), max_bytes=1 << 62)
    try:
        runs = []
        for i in range(args.warmup + args.runs):
            if progress:
                progress(cfg, i, args.warmup + args.runs)
            run = run_once(model, tokenizer, path, backend_options(args, cfg.backend), store)
            if i >= args.warmup:
                runs.append(run)
    finally:
        if tmp is not None:
            tmp.cleanup()
    stats = {k: summarize([r.stages[k] for r in runs]) for k in STAGE_KEYS}
    for r in runs:
        notes.extend(n for n in r.notes if n not in notes)
    if stats["cached_reopen"] is not None:
        notes = [n for n in notes if not n.startswith("cached reopen not measured")]
    work, shares = work_and_shares(model, runs, stats, peak, args.kv_bits)
    stage_sums = [sum(r.stages[k] for k in ("frame_decode", "preprocess", "vision_tower",
                                            "projector_pooling", "prefill")) for r in runs]
    ttfts = [r.stages["ttft"] for r in runs]
    c = runs[0].counts
    return {
        "config": {"model": cfg.model, "size": cfg.size, "family": model.config.family,
                   "recipe": cfg.recipe, "dtype": cfg.dtype, "q_bits": cfg.q_bits,
                   "q_group_size": args.q_group_size if cfg.q_bits else None,
                   "num_frames": model.config.sampling.num_frames, "kv_bits": args.kv_bits,
                   "vision_backend": cfg.backend,
                   "visual_tokens": c["visual"], "prompt_tokens": c["prompt"],
                   "generated_tokens": c["generated"], "followup_prompt_tokens": c["followup_prompt"],
                   "label": cfg.label()},
        "stages": {k: ({**stats[k], "unit": unit} if stats[k] else None)
                   for k, _, unit in STAGES},
        "runs": [{k: r.stages[k] for k in STAGE_KEYS} for r in runs],
        "work": work,
        "share_of_peak": shares,
        "memory_gb": memory_report(model, runs, args.max_tokens, getattr(args, "kv_bits", None)),
        "accounting": {"stage_sum_s": statistics.median(stage_sums),
                       "ttft_s": statistics.median(ttfts),
                       "unaccounted_s": statistics.median(t - s for t, s in zip(ttfts, stage_sums))},
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------
# The video


def make_video(path: Path, seconds: float = 10.0, fps: float = 25.0, width: int = 640,
               height: int = 360) -> Path:
    """A generated clip (MPEG-4 part 2 in .mp4): moving shapes on a gradient."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise UserError("OpenCV cannot write a test video here: pass --video FILE")
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    for i in range(int(seconds * fps)):
        frame = np.broadcast_to(ramp * np.array([1.0, 0.5, 0.2]) + i, (height, width, 3))
        frame = (frame % 256).astype(np.uint8).copy()
        x = int(i * 7) % (width - 80)
        cv2.rectangle(frame, (x, height // 3), (x + 80, height // 3 + 60), (0, 0, 255), -1)
        cv2.circle(frame, (width - x - 40, 2 * height // 3), 30, (0, 255, 0), -1)
        writer.write(frame)
    writer.release()
    return path


# ---------------------------------------------------------------------------------------
# The command


def machine_info() -> dict:
    import mlx.core as mx

    from sfllava_mlx.random_weights import memory_limit_bytes

    chip = hardware.detect_chip()
    limit, source = memory_limit_bytes()
    return {"platform": f"{platform.system()} {platform.machine()}",
            "chip": chip.name if chip else None,
            "device": str(mx.default_device()),
            "mlx": getattr(mx, "__version__", "?"),
            "memory_gb": round(limit / 1e9, 1), "memory_source": source,
            "cpu_count": os.cpu_count()}


def main(args) -> int:
    configs = configurations(args)
    if args.video:
        from . import runner

        runner.check_video_path(args.video)
    import mlx.core as mx

    from sfllava_mlx.random_weights import as_dtype

    compute_dtype = as_dtype(args.dtype) if args.dtype else None
    peak = hardware.resolve_peak(args.peak_tflops, args.peak_bandwidth_gbs, args.calibrate,
                                 compute_dtype or (mx.float32 if mx.default_device() == mx.cpu
                                                   else mx.float16))
    report = {"schema": SCHEMA, "machine": machine_info(), "peak": peak.to_dict(),
              "settings": {"runs": args.runs, "warmup": args.warmup, "max_tokens": args.max_tokens,
                           "prompt": args.prompt, "followup": args.followup, "seek": args.seek},
              "rows": []}
    console = None if args.json else _console()
    with tempfile.TemporaryDirectory(prefix="sfllava-bench-") as tmp:
        path = args.video or str(make_video(Path(tmp) / "bench.mp4"))
        report["video"] = {"path": args.video, "generated": not args.video}
        groups: dict = {}
        for cfg in configs:
            groups.setdefault((cfg.size, cfg.q_bits), []).append(cfg)
        for group in groups.values():
            if console:
                from sfllava_mlx.random_weights import display_name

                name = group[0].size and f"{display_name(group[0].size)}, random weights"
                console.print(f"[dim]loading {name or group[0].model} ...[/dim]")
            model, tokenizer = build_model(group[0], args, group)
            for cfg in group:
                cfg.dtype, cfg.q_bits = group[0].dtype, group[0].q_bits
                cfg.family = model.config.family
                try:
                    sampling = model.config.use_recipe(cfg.recipe, cfg.num_frames)
                except ValueError as e:
                    raise UserError(str(e)) from None
                cfg.num_frames = sampling.num_frames
                row = bench_row(cfg, model, tokenizer, path, args, peak,
                                progress=_progress(console))
                report["rows"].append(row)
                if console:
                    print_row(console, row)
            del model, tokenizer
            mx.clear_cache()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_summary(console, report)
    return 0


# ---------------------------------------------------------------------------------------
# The rich report


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _progress(console):
    if console is None:
        return None

    def show(cfg, i, total):
        console.print(f"[dim]  run {i + 1}/{total}: {cfg.label()}[/dim]")

    return show


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _fmt_work(key: str, work: dict) -> str:
    w = work.get(key)
    if not w:
        return ""
    if "flops" in w and key != "followup_ttft":
        return _si(w["flops"], "FLOP")
    if "bytes_per_token" in w:
        return _si(w["bytes_per_token"], "B/tok")
    if "bytes" in w:
        return _si(w["bytes"], "B")
    return ""


def _fmt_rate(key: str, row: dict) -> str:
    """What the median achieves: TFLOPS or GB/s."""
    w, s = row["work"].get(key), row["stages"].get(key)
    if not w or not s or not s["median"]:
        return ""
    if key == "decode":
        return _si(w["bytes_per_token"] * s["median"], "B/s")
    if key == "followup_ttft":
        return _si(w["bytes"] / s["median"], "B/s")
    return _si(w["flops"] / s["median"], "FLOP/s")


def print_row(console, row: dict) -> None:
    from rich.table import Table

    table = Table(title=row["config"]["label"], title_justify="left")
    for name, justify in (("stage", "left"), ("median", "right"), ("min", "right"),
                          ("max", "right"), ("work", "right"), ("achieved", "right"),
                          ("of peak", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for key, label, unit in STAGES:
        s = row["stages"].get(key)
        if s is None:
            table.add_row(label, "not measured", "", "", "", "", "")
            continue
        fmt = (lambda v: f"{v:.1f} t/s") if unit == "tok/s" else (lambda v: f"{v:.3f} s")
        share = row["share_of_peak"].get(key)
        table.add_row(label, fmt(s["median"]), fmt(s["min"]), fmt(s["max"]),
                      _fmt_work(key, row["work"]), _fmt_rate(key, row),
                      f"{100 * share:.1f}%" if share is not None else "")
    console.print(table)
    m, a = row["memory_gb"], row["accounting"]
    console.print(f"peak memory {m['peak']:.2f} GB = weights {m['weights']:.2f} + KV cache "
                  f"{m['kv_cache']:.2f} + working set (vision {m['vision_working_set']:.2f}, "
                  f"prefill {m['prefill_working_set']:.2f}) GB; budget weights + KV + 1 GB = "
                  f"{m['budget_weights_kv_plus_1gb']:.2f} GB; memory plan's estimate "
                  f"{m['plan_estimate']:.2f} GB")
    c = row["config"]
    console.print(f"{c['visual_tokens']} visual tokens, {c['prompt_tokens']} prompt tokens, "
                  f"{c['generated_tokens']} generated; stages sum to {a['stage_sum_s']:.3f} s of "
                  f"a {a['ttft_s']:.3f} s time to first token")
    for note in row["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print()


def print_summary(console, report: dict) -> None:
    from rich.table import Table

    peak = report["peak"]
    figures = ", ".join(x for x in (
        f"{peak['tflops']} TFLOPS" if peak["tflops"] else "",
        f"{peak['bandwidth_gbs']} GB/s" if peak["bandwidth_gbs"] else "") if x)
    console.print(f"peak: {figures or 'none'} ({peak['source']})")
    if len(report["rows"]) < 2:
        return
    table = Table(title="sweep", title_justify="left")
    for name in ("configuration", "ttft", "decode", "follow-up", "peak memory"):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for row in report["rows"]:
        s = row["stages"]
        dec = s.get("decode")
        table.add_row(row["config"]["label"], f"{s['ttft']['median']:.2f} s",
                      f"{dec['median']:.1f} tok/s" if dec else "-",
                      f"{s['followup_ttft']['median']:.2f} s",
                      f"{row['memory_gb']['peak']:.2f} GB")
    console.print(table)
