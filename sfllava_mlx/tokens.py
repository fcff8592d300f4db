"""How many visual tokens a recipe makes (design.md §1.5, §2.1): arithmetic on the grid, no
arrays, so the memory plan and `sfllava frames` count tokens without importing MLX's ops."""

from __future__ import annotations

import math

from .config import SamplingConfig


def pooled_size(grid: int, stride: int) -> int:
    """The side of a grid resized (bilinear) by a stride: ceil(G / stride)."""
    return math.ceil(grid / stride)


def pooled_grid(grid: int, stride: int, mode: str) -> int:
    """The side of a pooled grid."""
    if mode == "average":
        return grid // stride
    return pooled_size(grid, stride)


def num_visual_tokens(grid: int, sampling: SamplingConfig) -> int:
    total = 0
    n_slow = len(range(0, sampling.num_frames, sampling.slow_every))
    for frames, stride in ((n_slow, sampling.slow_stride),
                           (sampling.num_frames - n_slow, sampling.fast_stride)):
        g = pooled_grid(grid, stride, sampling.pool_mode)
        per_frame = {"grid": g * (g + 1), "frame": g * g + 1}.get(sampling.newline, g * g)
        total += frames * per_frame
    return total + (1 if sampling.newline == "one_token" else 0)
