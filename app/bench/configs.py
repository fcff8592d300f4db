"""`sfllava bench`: the configurations a run sweeps (model size x bits x recipe x frames x
vision backend), and the model each group of them shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from sfllava_mlx.errors import UserError

from . import hardware


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
        from . import random_weights as rw  # MLX models: not for --help

        name = f"{rw.display_name(self.size)} (random weights)" if self.size else self.model
        if self.family and not self.size:
            name = f"{name} [{self.family}]"
        bits = f"{self.q_bits}-bit LLM" if self.q_bits else "unquantized"
        return (f"{name}, {self.dtype}, {bits}, recipe {self.recipe}, {self.num_frames} frames, "
                f"vision {self.backend}")


def configurations(args) -> list[Config]:
    from . import random_weights as rw  # MLX models: not for --help

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
    for s in sizes:
        if s is not None and s not in rw.SIZES:
            raise UserError(f"unknown size {s!r} in --sizes: choose from {', '.join(rw.SIZES)}")
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
    from sfllava_mlx.coreml_vision import require_macos
    from sfllava_mlx.options import COMPUTE_UNITS

    name, _, units = text.partition(":")
    if name == "mlx" and not units:
        return "mlx"
    if name == "coreml" and (units or "ALL") in COMPUTE_UNITS:
        require_macos()  # before any model is built
        return f"coreml:{units or 'ALL'}"
    raise UserError(f"--vision-backend {text}: use mlx or coreml[:{'|'.join(COMPUTE_UNITS)}]")


def backend_options(args, cfg: Config) -> dict:
    """The Session options of one configuration (its recipe, frames and vision backend)."""
    name, _, units = cfg.backend.partition(":")
    return dict(recipe=cfg.recipe, num_frames=cfg.num_frames, seek=args.seek,
                kv_bits=args.kv_bits, vision_backend=name, compute_units=units or "ALL",
                max_tokens=args.max_tokens)


# ---------------------------------------------------------------------------------------
# Models


def longest_video(config, rows: list[Config]) -> int:
    """The visual tokens of the longest video the rows will prefill."""
    from sfllava_mlx.tokens import num_visual_tokens

    return max(num_visual_tokens(config.vision.grid, config.recipe(row.recipe, row.num_frames))
               for row in rows)


def build_model(cfg: Config, args, rows: Optional[list] = None):
    """(model, tokenizer) for a configuration; the machine is checked before allocating,
    for the longest video of `rows` (the configurations that will share the model)."""
    import mlx.core as mx

    from . import random_weights as rw  # MLX models: not for --help

    rows = rows or [cfg]
    if cfg.size:
        dtype = rw.as_dtype(cfg.dtype)
        model, tokenizer = rw.random_model(
            cfg.size, dtype, q_bits=cfg.q_bits, q_group_size=args.q_group_size,
            visual_tokens=longest_video(rw.model_config(cfg.size), rows))
    else:
        from sfllava_mlx.model import default_dtype, load

        dtype = rw.as_dtype(cfg.dtype) if cfg.dtype else default_dtype()
        model, tokenizer = load(cfg.model, dtype=dtype, lazy=True)
        if cfg.q_bits:
            if model.config.quantization:
                raise UserError(f"{cfg.model} is already quantized "
                                f"({model.config.quantization.get('bits')} bits): drop --q-bits")
            rw.quantize_language_model(model, cfg.q_bits, args.q_group_size)
        rw.check_fits(model, longest_video(model.config, rows), str(cfg.model))
        mx.eval(model.parameters())
    cfg.dtype = rw.dtype_name(model.language_model.model.norm.weight.dtype)
    if cfg.q_bits is None and model.config.quantization:
        cfg.q_bits = model.config.quantization.get("bits")
    return model, tokenizer
