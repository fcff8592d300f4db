"""What generate, chat and bench share: load a model, open a video, report a turn."""

from __future__ import annotations

import time

from sfllava_mlx import load
from sfllava_mlx.generate import Conversation, VisualTokens, encode_video


def load_model(args):
    """Load --model; --num-frames overrides the model's sample positions."""
    model, tokenizer = load(args.model)
    if getattr(args, "num_frames", None):
        model.config.sampling.num_frames = args.num_frames
    return model, tokenizer


def vision_backend(model, args):
    """None for MLX's own tower, else a Core ML tower with the same call signature."""
    if getattr(args, "vision_backend", "mlx") != "coreml":
        return None
    from sfllava_mlx.coreml_vision import CoreMLVisionTower

    return CoreMLVisionTower(model.path, model.config, compute_units=args.compute_units)


def sample_video(model, path, args):
    from sfllava_mlx.frames import read_frames

    s = model.config.sampling
    tic = time.perf_counter()
    clip = read_frames(path, num_frames=s.num_frames, slow_every=s.slow_every,
                       seek=getattr(args, "seek", "exact"))
    clip.timings = {"frames": time.perf_counter() - tic}
    return clip


def open_video(model, path, args, progress=None) -> tuple[VisualTokens, str]:
    """Frames -> visual tokens; returns them and the cache status ("off" until cached)."""
    clip = sample_video(model, path, args)
    visual = encode_video(model, clip, vision=vision_backend(model, args), progress=progress)
    return visual, "off"


def new_conversation(model, tokenizer, visual, args) -> Conversation:
    return Conversation(model, tokenizer, visual, system_prompt=args.system_prompt,
                        max_kv_size=args.max_kv_size, kv_bits=args.kv_bits)


def ask_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)


def turn_record(turn, visual: VisualTokens, cache: str) -> dict:
    """The JSON object of SPEC §4 for one answered question."""
    return {
        "text": turn.text,
        "tokens": turn.tokens,
        "logprobs": turn.logprobs,
        "prompt_tokens": turn.prompt_tokens,
        "visual_tokens": int(visual.embeddings.shape[0]),
        "timings_s": {k: round(v, 6) for k, v in turn.timings_s.items()},
        "peak_memory_gb": round(turn.peak_memory_gb, 4),
        "cache": cache,
        "finish_reason": turn.finish_reason,
    }
