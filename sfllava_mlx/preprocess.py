"""Frames to normalized pixels (design.md §1.2)."""

import cv2
import mlx.core as mx
import numpy as np

from .config import PreprocessConfig


def resize_frame(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB uint8 frame to size x size, ignoring aspect ratio."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    grows = h < size and w < size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC if grows else cv2.INTER_AREA)


def normalize(images: np.ndarray, config: PreprocessConfig) -> mx.array:
    """(B, S, S, 3) uint8 -> float32 (x / 255 - mean) / std, on the default device."""
    x = mx.array(images).astype(mx.float32) / 255.0
    mean = mx.array(config.image_mean, dtype=mx.float32)
    std = mx.array(config.image_std, dtype=mx.float32)
    return (x - mean) / std


def preprocess(images, config: PreprocessConfig) -> mx.array:
    """A list of RGB uint8 frames -> (B, S, S, 3) float32 pixels."""
    resized = np.stack([resize_frame(im, config.image_size) for im in images])
    return normalize(resized, config)
