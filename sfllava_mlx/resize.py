"""Grid resizing with the numbers of torch.nn.functional.interpolate.

Both uses (the vision tower's position table and SlowFast pooling of a grid that the
stride does not divide) resize a small (G, G, D) grid with align_corners=False and no
antialias. A separable resize is two small matrix products, which MLX runs on the
default device, so the grid never leaves it.
"""

import mlx.core as mx
import numpy as np


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    # Keys' cubic convolution kernel with torch's A = -0.75.
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def interpolation_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) weights so that out = W @ in along one axis."""
    scale = n_in / n_out
    dst = np.arange(n_out, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    if mode == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps negative source indices for linear modes
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        np.add.at(w, (rows, i0), 1.0 - lam)
        np.add.at(w, (rows, i1), lam)
    elif mode == "bicubic":
        i = np.floor(src).astype(np.int64)
        t = src - i
        for k in range(-1, 3):
            idx = np.clip(i + k, 0, n_in - 1)  # border replication, as torch does
            np.add.at(w, (rows, idx), _cubic(t - k))
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    return w.astype(np.float32)


def resize_grid(x: mx.array, size: int, mode: str) -> mx.array:
    """Resize (..., H, W, D) to (..., size, size, D)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (size, size):
        return x
    wh = mx.array(interpolation_matrix(h, size, mode), dtype=x.dtype)
    ww = mx.array(interpolation_matrix(w, size, mode), dtype=x.dtype)
    x = mx.einsum("ih,...hwd->...iwd", wh, x)
    return mx.einsum("jw,...iwd->...ijd", ww, x)

