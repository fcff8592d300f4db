"""SlowFast pooling and the token order (design.md §1.5-§1.6, §2.1), in MLX on the default device.

A recipe's `pool_mode` says how a frame's projected grid shrinks by a stride, its `newline`
where the learned `image_newline` vector goes. Both are config fields, so every model
family runs this one code path.
"""

import mlx.core as mx

from .config import SamplingConfig
from .resize import resize_grid
from .tokens import pooled_size


def pool_frames(x: mx.array, stride: int, mode: str = "auto") -> mx.array:
    """(T, G, G, D) -> (T, g, g, D).

    auto: average pool with kernel = stride, no padding; a grid the stride does not divide
    is resized bilinearly straight to ceil(G/stride). bilinear: always that resize.
    average: kernel = stride, remainder rows and columns dropped (F.avg_pool2d).
    """
    T, G, _, D = x.shape
    if mode == "bilinear" or (mode == "auto" and G % stride):
        return resize_grid(x, pooled_size(G, stride), "bilinear")
    g = G // stride
    x = x[:, : g * stride, : g * stride]
    return x.reshape(T, g, stride, g, stride, D).mean(axis=(2, 4))


def is_slow(position: int, sampling: SamplingConfig) -> bool:
    return position % sampling.slow_every == 0


def stride_of(slow: bool, sampling: SamplingConfig) -> int:
    return sampling.slow_stride if slow else sampling.fast_stride


def with_newlines(block: mx.array, sampling: SamplingConfig, newline) -> mx.array:
    """(T, g, g, D) pooled frames -> (tokens, D), `newline` after each row or frame as the
    recipe says (the one_token newline comes after the whole video: `concat_streams`)."""
    rule = sampling.newline
    if rule != "none" and newline is None:
        raise ValueError(f"the recipe places an image newline ({rule}) but the model has none")
    T, g, _, D = block.shape
    if rule == "grid":
        nl = mx.broadcast_to(newline.astype(block.dtype), (T, g, 1, D))
        block = mx.concatenate([block, nl], axis=2)
    elif rule == "frame":
        nl = mx.broadcast_to(newline.astype(block.dtype), (T, 1, D))
        return mx.concatenate([block.reshape(T, g * g, D), nl], axis=1).reshape(-1, D)
    return block.reshape(-1, D)


def concat_streams(slow, fast, *, sampling: SamplingConfig = None, newline=None) -> mx.array:
    """Token order: slow block then fast block; in each, frame-major then row-major, with
    the recipe's newline rule applied over the slow block, then the fast block."""
    sampling = sampling or SamplingConfig(newline="none")
    parts = [with_newlines(p, sampling, newline) for p in (slow, fast) if p is not None]
    if sampling.newline == "one_token":
        parts.append(newline.astype(parts[0].dtype)[None])
    return mx.concatenate(parts, axis=0)
