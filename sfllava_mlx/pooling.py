"""SlowFast pooling (SPEC §2.5-2.6) on the projected grid, in MLX on the default device."""

import mlx.core as mx

from .config import SamplingConfig
from .resize import pooled_size, resize_grid


def pool_frames(x: mx.array, stride: int) -> mx.array:
    """(T, G, G, D) -> (T, g, g, D): average pool with kernel = stride, no padding.

    A grid the stride does not divide is resized bilinearly straight to ceil(G/stride).
    """
    T, G, _, D = x.shape
    if G % stride:
        return resize_grid(x, pooled_size(G, stride), "bilinear")
    g = G // stride
    return x.reshape(T, g, stride, g, stride, D).mean(axis=(2, 4))


def is_slow(position: int, sampling: SamplingConfig) -> bool:
    return position % sampling.slow_every == 0


def slowfast_pool(grid: mx.array, sampling: SamplingConfig) -> mx.array:
    """(T, G, G, D) projected tokens in position order -> (Nv, D): slow block, then fast."""
    slow = [t for t in range(grid.shape[0]) if is_slow(t, sampling)]
    fast = [t for t in range(grid.shape[0]) if not is_slow(t, sampling)]
    return concat_streams(
        pool_frames(grid[mx.array(slow)], sampling.slow_stride) if slow else None,
        pool_frames(grid[mx.array(fast)], sampling.fast_stride) if fast else None,
    )


def concat_streams(slow, fast) -> mx.array:
    """Token order: slow block then fast block; in each, frame-major then row-major."""
    parts = [p.reshape(-1, p.shape[-1]) for p in (slow, fast) if p is not None]
    return mx.concatenate(parts, axis=0)


def num_visual_tokens(grid: int, sampling: SamplingConfig) -> int:
    n_slow = len(range(0, sampling.num_frames, sampling.slow_every))
    n_fast = sampling.num_frames - n_slow
    return (n_slow * pooled_size(grid, sampling.slow_stride) ** 2
            + n_fast * pooled_size(grid, sampling.fast_stride) ** 2)
