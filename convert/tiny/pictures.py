"""A deterministic test picture, for the picture tests and the image benchmark."""

from __future__ import annotations

import numpy as np


def picture_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB picture: gradients, a coloured block and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                  ((x + 2 * y) * 9 + 40 * seed) % 256], -1).astype(np.int32)
    a[height // 4: height // 2 + 1, width // 3: width // 2 + 1] = [230, 20 + 50 * seed, 30]
    a += rng.integers(-12, 13, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)
