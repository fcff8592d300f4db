"""The memory plan (SPEC §2.10's long videos): will a request fit, before any work starts?

From the model's shapes, the recipe, the frame count and the KV settings, estimate the
peak of what MLX will hold: the weights, the KV cache of the whole conversation, and the
largest working set of the stages that run one after another (the vision tower on one
batch of frames, or the prefill of one chunk). A request that cannot fit is refused with
the estimate, the limit, and what would make it fit — never halfway through a video.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig, SamplingConfig
from .errors import ContextOverflowError, UserError
from .generate import PREFILL_STEP, VISION_BATCH  # what one tower call / prefill chunk takes
from .pooling import num_visual_tokens

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
PROMPT_TEXT_TOKENS = 64  # system prompt, chat markup and a question, beside the video
MIN_TEXT_TOKENS = 16  # the ChatML markup around the video and one answer token, at least


class MemoryPlanError(UserError):
    """A request that will not fit in memory (exit 2)."""


@dataclass
class MemoryPlan:
    weights: int
    kv_cache: int
    vision: int  # one batch of frames through the tower
    prefill: int  # one chunk of the prompt through the LLM
    context_tokens: int

    @property
    def working_set(self) -> int:
        return max(self.vision, self.prefill)  # the stages run one after another

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working_set

    def describe(self) -> str:
        return (f"{_gb(self.total)} (weights {_gb(self.weights)} + KV cache "
                f"{_gb(self.kv_cache)} for {self.context_tokens} tokens + working set "
                f"{_gb(self.working_set)})")


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 10 * GB else f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def weight_bytes(model) -> int:
    """Bytes of the parameters as held (packed ints and scales included); lazy arrays too."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def compute_dtype_size(model) -> int:
    return model.language_model.model.norm.weight.dtype.size


def kv_bytes_per_token(config: ModelConfig, dtype_size: int, kv_bits: Optional[int] = None,
                       kv_group_size: int = 64) -> float:
    t = config.text_config
    head_dim = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    per_element = dtype_size
    if kv_bits:  # packed values, plus a scale and a bias per group in the compute dtype
        per_element = kv_bits / 8 + 2 * dtype_size / kv_group_size
    return 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * head_dim * per_element


def vision_bytes(config: ModelConfig, dtype_size: int, batch: int = VISION_BATCH) -> int:
    """One tower block on one batch: residual, attention, MLP and the score matrices
    (materialized where attention is not fused), plus the projected grid."""
    v = config.vision
    n = v.num_patches
    per_token = (4 * v.hidden_size + 2 * v.intermediate_size) * dtype_size
    scores = v.num_attention_heads * n * n * 4  # softmax in float32
    projected = 2 * config.projector.hidden_size * dtype_size
    return batch * n * (per_token + projected) + batch * scores


def prefill_bytes(config: ModelConfig, dtype_size: int, context: int,
                  chunk: int = PREFILL_STEP) -> int:
    """One LLM layer on one chunk: hidden states, q/k/v, the MLP and the scores over the
    context, plus the chunk's input embeddings."""
    t = config.text_config
    chunk = min(chunk, context)
    per_token = (6 * t["hidden_size"] + 3 * t["intermediate_size"]) * dtype_size
    scores = t["num_attention_heads"] * chunk * context * 4
    return chunk * per_token + scores


def plan_memory(model, sampling: SamplingConfig, **options) -> MemoryPlan:
    """The plan of a video's request: its recipe's visual tokens and frames."""
    return plan_tokens(model, num_visual_tokens(model.config.vision.grid, sampling),
                       sampling.num_frames, **options)


def plan_tokens(model, visual: int, tower_inputs: int, *, max_tokens: int = 512,
                kv_bits: Optional[int] = None, kv_group_size: int = 64,
                max_kv_size: Optional[int] = None) -> MemoryPlan:
    """The plan of `visual` tokens made from `tower_inputs` tower images (frames or tiles)."""
    config = model.config
    size = compute_dtype_size(model)
    context = visual + PROMPT_TEXT_TOKENS + max_tokens
    held = min(context, max_kv_size) if max_kv_size else context
    held = math.ceil(held / KV_STEP) * KV_STEP
    return MemoryPlan(
        weights=weight_bytes(model),
        kv_cache=int(kv_bytes_per_token(config, size, kv_bits, kv_group_size) * held),
        vision=vision_bytes(config, size, min(VISION_BATCH, tower_inputs)),
        prefill=prefill_bytes(config, size, visual + PROMPT_TEXT_TOKENS),
        context_tokens=context,
    )


# ----------------------------------------------------------------------------------------
# What the machine can give


def memory_limit() -> tuple[int, str]:
    """(bytes, where the figure comes from). $SFLLAVA_MEMORY_LIMIT_GB wins (tests, shared
    machines); on a Mac, Metal's recommended working set; elsewhere the memory MLX holds
    now plus what the system still has available."""
    forced = os.environ.get("SFLLAVA_MEMORY_LIMIT_GB")
    if forced:
        try:
            return int(float(forced) * GB), "SFLLAVA_MEMORY_LIMIT_GB"
        except ValueError:
            pass
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return int(working_set), "Metal's recommended working set"
    if mx.default_device() == mx.gpu and info.get("total_memory"):  # a discrete GPU (CUDA)
        return int(info["total_memory"]), f"{info.get('device_name', 'the GPU')}'s memory"
    available = available_memory()
    if available:
        return available + mx.get_active_memory(), "available memory"
    return physical_memory(), "physical memory"


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    return 0


# ----------------------------------------------------------------------------------------
# The check


def largest_fitting_frames(model, sampling: SamplingConfig, limit: int, context_limit: int,
                           **options) -> int:
    """The most frames (same recipe) that fit both the memory and the context; 0 if none."""
    def fits(t: int) -> bool:
        s = SamplingConfig(**{**sampling.__dict__, "num_frames": t})
        return (plan_memory(model, s, **options).total <= limit
                and least_context(model, s) <= context_limit)

    lo, hi = 0, sampling.num_frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def least_context(model, sampling: SamplingConfig) -> int:
    """Tokens any answer about this video needs: the video, the chat markup, one token.
    (A longer answer is cut to the context, as mlx-lm does; memory counts --max-tokens.)"""
    return num_visual_tokens(model.config.vision.grid, sampling) + MIN_TEXT_TOKENS


def check_plan(model, sampling: SamplingConfig, *, context_limit: int, max_tokens: int = 512,
               kv_bits: Optional[int] = None, kv_group_size: int = 64,
               max_kv_size: Optional[int] = None, context_name: str = "the context") -> MemoryPlan:
    """The plan, or a one-line refusal that says the estimate, the limit and the fix."""
    options = dict(max_tokens=max_tokens, kv_bits=kv_bits, kv_group_size=kv_group_size,
                   max_kv_size=max_kv_size)
    p = plan_memory(model, sampling, **options)
    limit, source = memory_limit()
    over_context = least_context(model, sampling) > context_limit
    over_memory = bool(limit) and p.total > limit
    if not (over_context or over_memory):
        return p
    fixes = []
    if over_memory and not kv_bits:
        q = plan_memory(model, sampling, **{**options, "kv_bits": 8})
        if q.total <= limit and not over_context:
            fixes.append(f"--kv-bits 8 ({_gb(q.total)})")
    frames = largest_fitting_frames(model, sampling, limit or p.total, context_limit, **options)
    if frames:
        fixes.append(f"--num-frames {frames} (or --fps)")
    if over_memory:
        fixes.append("a smaller model")
    fix = "; it would fit with " + ", or ".join(fixes)
    if over_context:
        visual = num_visual_tokens(model.config.vision.grid, sampling)
        raise ContextOverflowError(
            f"this video's {visual} visual tokens ({sampling.num_frames} frames) and the prompt "
            f"pass {context_name} of {context_limit} tokens" + fix)
    raise MemoryPlanError(f"this request needs about {p.describe()}, more than the "
                          f"{_gb(limit)} of {source}" + fix)
