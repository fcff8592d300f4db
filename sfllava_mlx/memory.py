"""The memory plan (design.md §10's long videos): will a request fit, before any work starts?

From the model's shapes, the visual tokens, the tower inputs and the KV settings, estimate
the peak of what MLX will hold: the weights, the KV cache of the whole conversation, and the
largest working set of the stages that run one after another (the vision tower on one
batch of frames or tiles, or the prefill of one chunk). A request that cannot fit is refused
with the estimate, the limit, and what would make it fit — never halfway through a video.
Videos, pictures and random-weight models all go through `check`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Optional

from .config import PREFILL_STEP, VISION_BATCH, ModelConfig, SamplingConfig
from .errors import ContextOverflowError, MemoryPlanError
from .system import memory_limit
from .tokens import num_visual_tokens

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache grows in steps of this many tokens
PROMPT_TEXT_TOKENS = 64  # system prompt, chat markup and a question, beside the video
MIN_TEXT_TOKENS = 16  # the ChatML markup around the video and one answer token, at least


@dataclass
class MemoryPlan:
    weights: int
    kv_cache: int
    vision: int  # one batch of frames through the tower
    prefill: int  # one chunk of the prompt through the LLM
    context_tokens: int
    visual_tokens: int = 0

    @property
    def working_set(self) -> int:
        return max(self.vision, self.prefill)  # the stages run one after another

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working_set

    def describe(self) -> str:
        return (f"{gb(self.total)} (weights {gb(self.weights)} + KV cache "
                f"{gb(self.kv_cache)} for {self.context_tokens} tokens + working set "
                f"{gb(self.working_set)})")


def gb(n: float) -> str:
    if n >= 10 * GB:
        return f"{n / GB:.1f} GB"
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def weight_bytes(model) -> int:
    """Bytes of the parameters as held (packed ints and scales included); lazy arrays too."""
    from mlx.utils import tree_flatten

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


def plan_tokens(model, visual: int, tower_inputs: int, *, max_tokens: int = 512,
                kv_bits: Optional[int] = None, kv_group_size: int = 64,
                max_kv_size: Optional[int] = None,
                text_tokens: int = PROMPT_TEXT_TOKENS) -> MemoryPlan:
    """The plan of `visual` tokens made from `tower_inputs` tower images (frames or tiles),
    with `text_tokens` of prompt text beside them and answers up to `max_tokens`."""
    config = model.config
    size = compute_dtype_size(model)
    context = visual + text_tokens + max_tokens
    held = min(context, max_kv_size) if max_kv_size else context
    held = math.ceil(held / KV_STEP) * KV_STEP
    return MemoryPlan(
        weights=weight_bytes(model),
        kv_cache=int(kv_bytes_per_token(config, size, kv_bits, kv_group_size) * held),
        vision=vision_bytes(config, size, min(VISION_BATCH, tower_inputs)),
        prefill=prefill_bytes(config, size, visual + text_tokens),
        context_tokens=context,
        visual_tokens=visual,
    )


def check(plan: MemoryPlan, what: str, fixes: Callable[[], list] = list) -> MemoryPlan:
    """`plan`, or a one-line refusal that says the estimate, the machine's limit and, from
    `fixes()` (asked only when it does not fit), what would make it fit."""
    limit, source = memory_limit()
    if limit and plan.total > limit:
        ways = fixes()
        fit = "; it would fit with " + ", or ".join(ways) if ways else ""
        raise MemoryPlanError(f"{what} needs about {plan.describe()}, more than the "
                              f"{gb(limit)} of {source}{fit}")
    return plan


def check_context(needed: int, limit: int, what: str, limit_name: str, fix: str = "") -> None:
    if needed > limit:
        raise ContextOverflowError(f"{what} pass {limit_name} of {limit} tokens{fix}")


# ----------------------------------------------------------------------------------------
# Videos: the fixes are other settings of the same request


def plan_video(model, sampling: SamplingConfig, text_tokens: int = 0, **options) -> MemoryPlan:
    """The plan of a video's request: its recipe's visual tokens and frames, and
    `text_tokens` of prompt text beyond the usual (the subtitles of design.md §2.5)."""
    return plan_tokens(model, num_visual_tokens(model.config.vision.grid, sampling),
                       sampling.num_frames, text_tokens=PROMPT_TEXT_TOKENS + text_tokens,
                       **options)


def least_context(model, sampling: SamplingConfig, text_tokens: int = 0) -> int:
    """Tokens any answer about this video needs: the video, the chat markup, one token.
    (A longer answer is cut to the context, as mlx-lm does; memory counts max_tokens.)"""
    return num_visual_tokens(model.config.vision.grid, sampling) + MIN_TEXT_TOKENS + text_tokens


def largest_fitting_frames(model, sampling: SamplingConfig, limit: int, context_limit: int,
                           **options) -> int:
    """The most frames (same recipe) that fit both the memory and the context; 0 if none."""
    def fits(t: int) -> bool:
        s = replace(sampling, num_frames=t)
        return (plan_video(model, s, **options).total <= limit
                and least_context(model, s, options.get("text_tokens", 0)) <= context_limit)

    lo, hi = 0, sampling.num_frames
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_video(model, sampling: SamplingConfig, *, context_limit: int,
                context_name: str = "the context", **options) -> MemoryPlan:
    """The plan of a video's request, or a refusal naming --kv-bits / --num-frames fixes."""
    p = plan_video(model, sampling, **options)
    limit, _ = memory_limit()
    text = options.get("text_tokens", 0)  # the subtitles, counted in both checks

    def fixes() -> list:
        out = []
        if limit and p.total > limit and not options.get("kv_bits"):
            q = plan_video(model, sampling, **{**options, "kv_bits": 8})
            if q.total <= limit and least_context(model, sampling, text) <= context_limit:
                out.append(f"--kv-bits 8 ({gb(q.total)})")
        frames = largest_fitting_frames(model, sampling, limit or p.total, context_limit, **options)
        if frames:
            out.append(f"--num-frames {frames} (or --fps)")
        if limit and p.total > limit:
            out.append("a smaller model")
        return out

    if least_context(model, sampling, text) > context_limit:
        ways = fixes()
        check_context(least_context(model, sampling, text), context_limit,
                      f"this video's {p.visual_tokens} visual tokens ({sampling.num_frames} "
                      "frames) and the prompt" + (f" with {text} tokens of subtitles" if text
                                                 else ""), context_name,
                      "; it would fit with " + ", or ".join(ways) if ways else "")
    return check(p, "this request", fixes)


# ----------------------------------------------------------------------------------------
# Answers decoding together (`batching`): every sequence's KV cache counts

# mlx-lm's BatchKVCache grows, pads and filters by copying (lazily: the old arrays live
# until the next step evaluates the new ones), so at its peak the batch's cache is there
# twice.
BATCH_COPIES = 2


def kv_bytes(model, tokens: int, kv_bits: Optional[int] = None) -> int:
    """The KV cache of `tokens` positions, as mlx-lm's caches hold them (in KV_STEP steps)."""
    held = math.ceil(tokens / KV_STEP) * KV_STEP
    return int(kv_bytes_per_token(model.config, compute_dtype_size(model), kv_bits) * held)


def batch_bytes(weights: int, working_set: int, starts: int, answers: list) -> int:
    """What answers decoding together hold at their peak: the weights, the largest working
    set, the KV caches they start from (`starts`: read, never written by the batch) and
    each answer's own in the batch (`answers`: its whole conversation), BATCH_COPIES times."""
    return weights + working_set + starts + BATCH_COPIES * sum(answers)


def fits(total: int) -> bool:
    limit, _ = memory_limit()
    return not limit or total <= limit


def batch_size(plan: MemoryPlan, wanted: int) -> int:
    """How many answers of one request (`plan`'s: one video, one prefix they all start
    from) decode together: `wanted`, or fewer where that many would not fit; at least 1
    (one answer alone was checked when the request was)."""
    k = max(1, wanted)
    while k > 1 and not fits(batch_bytes(plan.weights, plan.working_set, plan.kv_cache,
                                         [plan.kv_cache] * k)):
        k -= 1
    return k
