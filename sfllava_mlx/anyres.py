"""LLaVA-OneVision's any-resolution picture recipe (`anyres_max_N`, design.md §2.3), exactly as
transformers computes it for one picture:

- pixels, as `LlavaOnevisionImageProcessorPil` makes them: the best `grid_pinpoints`
  resolution (`select_best_resolution`), the picture resized into it keeping its aspect
  ratio (`get_patch_output_size`, Pillow's filter), zero-padded centred, cut into S x S
  tiles row by row; before them, the whole picture resized to S x S (the base image);
- tokens, as `LlavaOnevisionModel.pack_image_features` makes them from the projected
  features: the tiles' grids joined into one (rows x G, columns x G) grid, the padding cut
  away (`unpad_image`), bilinearly downsampled (align_corners=False) to
  (int(h // r), int(w // r)) where r = sqrt(h w / (N G²)) > 1.1, an image newline after
  each row; the base image's G x G tokens first, without newlines.

The geometry is integer arithmetic on the picture's size (`tiling`), so the token count is
known from the header alone (the cache and the memory plan use it before decoding). The
features stay MLX arrays on the default device throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .config import ImageConfig
from .resize import interpolation_matrix

DOWNSAMPLE_ABOVE = 1.1  # transformers (and LLaVA-NeXT): downsample only when r > 1.1


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers' `select_best_resolution`: (height, width) of the pinpoint that keeps
    the most of the picture's pixels, the least wasted among equals (first one wins)."""
    h0, w0 = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        dw, dh = int(w0 * scale), int(h0 * scale)
        effective = min(dw * dh, w0 * h0)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    return best


def patch_output_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: the picture's (height, width) inside target."""
    h0, w0 = size
    th, tw = target
    scale_w, scale_h = tw / w0, th / h0
    if scale_w < scale_h:
        return min(math.ceil(h0 * scale_w), th), tw
    return th, min(math.ceil(w0 * scale_h), tw)


def unpadded_slices(size: tuple[int, int], grid: tuple[int, int]) -> tuple[slice, slice]:
    """transformers' `unpad_image` on a (rows, columns) grid: the rows and columns kept."""
    h0, w0 = size
    ch, cw = grid
    if w0 / h0 > cw / ch:
        new_h = int(round(h0 * (cw / w0), 7))
        pad = (ch - new_h) // 2
        return slice(pad, ch - pad), slice(0, cw)
    new_w = int(round(w0 * (ch / h0), 7))
    pad = (cw - new_w) // 2
    return slice(0, ch), slice(pad, cw - pad)


@dataclass(frozen=True)
class Tiling:
    size: tuple  # the picture's (height, width), upright
    tile: int  # S: tile side in pixels (the tower's image size)
    grid: int  # G: tokens per tile side
    best: tuple  # the chosen pinpoint (height, width), pixels
    resized: tuple  # the picture inside it (height, width), pixels
    offset: tuple  # (top, left) of the resized picture in the padded canvas
    tiles: tuple  # (rows, columns) of tiles
    rows: slice  # unpadded rows of the joined (rows x G, columns x G) grid
    cols: slice
    final: tuple  # (height, width) of the grid after downsampling (= unpadded if none)

    @property
    def unpadded(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def downsampled(self) -> bool:
        return self.final != self.unpadded

    @property
    def num_tiles(self) -> int:
        """Tower inputs: the base image and the tiles."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def num_tokens(self) -> int:
        h, w = self.final
        return self.grid * self.grid + h * (w + 1)


def tiling(size: tuple[int, int], image: ImageConfig, tile: int, grid: int) -> Tiling:
    """The whole geometry of one (height, width) picture, from its size alone."""
    best = select_best_resolution(size, image.grid_pinpoints)
    resized = patch_output_size(size, best)
    offset = ((best[0] - resized[0]) // 2, (best[1] - resized[1]) // 2)
    tiles = (best[0] // tile, best[1] // tile)
    rows, cols = unpadded_slices(size, (tiles[0] * grid, tiles[1] * grid))
    h, w = rows.stop - rows.start, cols.stop - cols.start
    ratio = math.sqrt(h * w / (image.max_tiles * grid ** 2))
    final = (int(h // ratio), int(w // ratio)) if ratio > DOWNSAMPLE_ABOVE else (h, w)
    return Tiling(tuple(size), tile, grid, best, resized, offset, tiles, rows, cols, final)


def pil_filter(name: str):
    from PIL import Image

    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[name]


def tile_pixels(rgb, p: Tiling, resample: str = "bicubic") -> np.ndarray:
    """A PIL RGB picture -> uint8 (1 + tiles, S, S, 3): base image, then tiles row-major.

    The same Pillow calls as transformers' PIL processor, so the same pixels: the picture
    resized into the pinpoint, pasted centred on zeros, cut into tiles; the picture
    resized to S x S."""
    S = p.tile
    f = pil_filter(resample)
    rh, rw = p.resized
    canvas = np.zeros((p.best[0], p.best[1], 3), dtype=np.uint8)
    top, left = p.offset
    canvas[top:top + rh, left:left + rw] = np.asarray(rgb.resize((rw, rh), resample=f))
    nr, nc = p.tiles
    tiles = canvas.reshape(nr, S, nc, S, 3).transpose(0, 2, 1, 3, 4).reshape(nr * nc, S, S, 3)
    base = np.asarray(rgb.resize((S, S), resample=f))
    return np.concatenate([base[None], tiles])


def resize_hw(x: mx.array, height: int, width: int) -> mx.array:
    """Bilinear resize of a (H, W, D) grid to (height, width), align_corners=False, no
    antialias: torch.nn.functional.interpolate's numbers, as two small matrix products."""
    h, w = x.shape[0], x.shape[1]
    wh = mx.array(interpolation_matrix(h, height, "bilinear"), dtype=x.dtype)
    ww = mx.array(interpolation_matrix(w, width, "bilinear"), dtype=x.dtype)
    x = mx.einsum("ih,hwd->iwd", wh, x)
    return mx.einsum("jw,iwd->ijd", ww, x)


def pack(features: mx.array, p: Tiling, newline: mx.array) -> mx.array:
    """(1 + tiles, G*G, D) projected features -> (tokens, D): the base image's grid, then
    the unpadded (and downsampled) tile grid with `newline` after each row."""
    G = p.grid
    D = features.shape[-1]
    base = features[0]
    nr, nc = p.tiles
    grid = features[1:].reshape(nr, nc, G, G, D).transpose(0, 2, 1, 3, 4).reshape(nr * G, nc * G, D)
    grid = grid[p.rows, p.cols]
    if p.downsampled:
        grid = resize_hw(grid, *p.final)
    h, w = p.final
    nl = mx.broadcast_to(newline.astype(grid.dtype), (h, 1, D))
    tiles = mx.concatenate([grid, nl], axis=1).reshape(h * (w + 1), D)
    return mx.concatenate([base, tiles], axis=0)
