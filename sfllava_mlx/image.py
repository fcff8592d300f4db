"""One picture to visual tokens (design.md §2.3): decoding, and the config's image recipe.

A picture is recognised by its content (JPEG, PNG, WebP, HEIC/HEIF where pillow-heif is
installed, AVIF where Pillow decodes it), never by its name. Decoding is Pillow's: EXIF
orientation applied, RGB (transparency composited onto white, as transformers does), and a
picture whose header announces more than `MAX_PIXELS` pixels, or none, is refused before
anything is decoded.

The converted config's `image` section picks the recipe:
- `single`: resized to S x S as a frame is (design.md §1.2), the tower's whole grid, no pooling,
  no newline (SF-LLaVA-1.5's default while its image recipe is unpublished);
- `anyres_max_N` (LLaVA-OneVision): transformers' `LlavaOnevisionImageProcessorPil` pixel
  math with Pillow (the same resize filter, zero padding, S x S tiles) and
  `LlavaOnevisionModel.pack_image_features` as MLX ops (`anyres.py`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Optional

import mlx.core as mx
import numpy as np

from . import anyres
from .config import VISION_BATCH, ModelConfig, PreprocessConfig
from .encode import VisualTokens, encode_images_steps
from .errors import VideoError
from .frames import SampledFrames
from .preprocess import resize_frame
from .steps import Steps, run

# Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, about 179 megapixels:
# a 200 MP phone photo's 16384 x 12288 fits, a 30000 x 30000 scan does not).
MAX_PIXELS = 2 * 89_478_485
PICTURE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".heic", ".heif", ".hif",
                      ".avif")
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
               b"mif1", b"msf1"}
AVIF_BRANDS = {b"avif", b"avis"}
ORIENTATION = 0x0112  # EXIF tag
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the picture a quarter


class ImageError(VideoError):
    """The picture is missing, unreadable, too large or not a picture (exit 2)."""


# ----------------------------------------------------------------------------------------
# Recognising and opening a picture


def sniff(path) -> Optional[str]:
    """The picture format the file's first bytes announce, or None (`picture_format`)."""
    try:
        with open(path, "rb") as f:
            return picture_format(f.read(64))
    except OSError:
        return None


def picture_format(head: bytes) -> Optional[str]:
    """The picture format a file's first 64 bytes announce, or None (not a picture we read):
    JPEG, PNG, WebP, and ISO-BMFF files whose major brand is a HEIF or AVIF image brand (a
    video's mp4/mov brands are not)."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in HEIF_BRANDS:
            return "HEIF"
        if brand in AVIF_BRANDS:
            return "AVIF"
    return None


def is_picture(path) -> bool:
    return os.path.isfile(path) and sniff(path) is not None


def named_like_picture(path) -> bool:
    return str(path).lower().endswith(PICTURE_EXTENSIONS)


_heif_registered = False
_NO_BOMB_CHECK = threading.Lock()


def _heif_opener() -> bool:
    """Register pillow-heif's opener once; False where it is not installed."""
    global _heif_registered
    if not _heif_registered:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return False
        register_heif_opener()
        _heif_registered = True
    return True


@dataclass
class PictureInfo:
    """What the header says, before any pixel is decoded."""

    path: str
    format: str  # JPEG, PNG, WEBP, HEIF, AVIF
    width: int  # upright (EXIF orientation applied)
    height: int
    orientation: int = 1  # the EXIF tag (1 = upright)
    mode: str = ""  # Pillow's mode as stored (RGB, RGBA, L, P, CMYK, ...)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), upright: transformers' order."""
        return self.height, self.width


def _open(path, fmt: str):
    from PIL import Image, UnidentifiedImageError

    if fmt == "HEIF" and not _heif_opener():
        raise ImageError(f"cannot decode {path}: HEIC/HEIF pictures need pillow-heif "
                         "(pip install pillow-heif)")
    if fmt == "AVIF":
        from PIL import features

        if not features.check("avif"):
            raise ImageError(f"cannot decode {path}: this Pillow has no AVIF support")
    try:
        # Pillow's own bomb check would refuse without the size; `check_size` refuses at
        # the same limit, with it, before anything is decoded.
        with _NO_BOMB_CHECK:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(path, formats=[fmt])
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError, EOFError) as e:
        dims = _png_dims(path) if fmt == "PNG" else None
        if dims is not None and 0 in dims:  # Pillow does not identify an empty PNG
            check_size(path, *dims)
        raise ImageError(f"cannot read the picture {path}: {_reason(e)}") from None


def _png_dims(path) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def probe(path) -> PictureInfo:
    """Header only: format, upright size, orientation. Refuses a file that is not a
    picture, a picture with no pixels, and one past MAX_PIXELS, before decoding it."""
    path = str(path)
    if not os.path.exists(path):
        raise ImageError(f"picture not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"{path} is a directory, not a picture")
    fmt = sniff(path)
    if fmt is None:
        raise ImageError(f"{path} is not a picture: its content is not JPEG, PNG, WebP, HEIC "
                         "or AVIF")
    im = _open(path, fmt)
    try:
        w, h = im.size
        try:
            orientation = int(im.getexif().get(ORIENTATION, 1) or 1)
        except Exception:  # noqa: BLE001  a broken EXIF block: decoding will say more
            orientation = 1
        mode = im.mode
    finally:
        im.close()
    check_size(path, w, h)
    if orientation in SWAPS_SIDES:
        w, h = h, w
    return PictureInfo(path, fmt, w, h, orientation, mode)


def check_size(path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{path} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path} is too large a picture ({width}x{height}, "
                         f"{width * height / 1e6:.0f} megapixels; at most "
                         f"{MAX_PIXELS / 1e6:.0f})")


@dataclass
class Picture:
    info: PictureInfo
    image: object  # PIL.Image.Image, RGB, upright
    decode_s: float = 0.0

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(self.image)


def to_rgb(image):
    """RGB as transformers' `convert_to_rgb` makes it: transparency over white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright(image):
    """EXIF orientation applied (Pillow's ImageOps.exif_transpose)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def read_image(path, info: Optional[PictureInfo] = None) -> Picture:
    """Decode a picture: RGB, upright. Broken files are refused with one line."""
    tic = time.perf_counter()
    info = info or probe(path)
    im = _open(str(path), info.format)
    try:
        try:
            im.load()  # a truncated file fails here (Pillow's LOAD_TRUNCATED_IMAGES is off)
            rgb = to_rgb(upright(im))
        except (SyntaxError, ValueError, OSError, EOFError) as e:
            raise ImageError(f"cannot decode the picture {path}: {_reason(e)}") from None
    finally:
        im.close()
    if (rgb.height, rgb.width) != info.size:  # EXIF said one thing, the pixels another
        check_size(path, rgb.width, rgb.height)
        info = PictureInfo(info.path, info.format, rgb.width, rgb.height, info.orientation, info.mode)
    return Picture(info, rgb, time.perf_counter() - tic)


# ----------------------------------------------------------------------------------------
# What a picture stands for in a conversation (in place of a video's sampled frames)


@dataclass
class PictureLayout:
    """A picture's clip `info` (where a video's is a VideoInfo): what the header said and
    how the config's image recipe cut it."""

    format: str  # JPEG, PNG, WEBP, HEIF, AVIF
    width: int  # upright
    height: int
    orientation: int
    mode: str  # the image recipe: single, anyres_max_N
    tiles: list = field(default_factory=list)  # anyres: tile rows and columns
    grid: list = field(default_factory=list)  # anyres: the packed grid's rows and columns
    notes: list = field(default_factory=list)  # what the user should know (as a VideoInfo's)
    kind: str = "image"


def picture_clip(info: PictureInfo, config: ModelConfig) -> SampledFrames:
    """The clip of a picture's VisualTokens: no frames, the picture in `info`."""
    layout = PictureLayout(info.format, info.width, info.height, info.orientation,
                           config.image.mode)
    if config.image.anyres:
        p = anyres.tiling(info.size, config.image, config.vision.image_size, config.vision.grid)
        layout.tiles, layout.grid = list(p.tiles), list(p.final)
    return SampledFrames([], [], [], [], True, [], layout)


def num_image_tokens(config: ModelConfig, size: tuple[int, int]) -> int:
    """Visual tokens of a (height, width) picture under the config's image recipe."""
    if config.image.anyres:
        return anyres.tiling(size, config.image, config.vision.image_size, config.vision.grid).num_tokens
    return config.vision.num_patches


def describe(clip: SampledFrames) -> str:
    """One line: 'anyres_max_9: 3x5 tiles + base, grid 60x108' or 'single: 384x384'."""
    info = clip.info
    if info.tiles:
        t, g = info.tiles, info.grid
        return f"{info.mode}: base + {t[0]}x{t[1]} tiles, grid {g[0]}x{g[1]}"
    return f"{info.mode}: the whole picture at the tower's size"


# ----------------------------------------------------------------------------------------
# Pixels and tokens


def image_preprocess(config: ModelConfig) -> PreprocessConfig:
    """The frames' preprocessing, with the image recipe's own mean and std where it has
    them."""
    image = config.image
    return replace(config.preprocess, image_mean=image.image_mean or config.preprocess.image_mean,
                   image_std=image.image_std or config.preprocess.image_std)


def image_pixels(picture: Picture, config: ModelConfig) -> np.ndarray:
    """The picture's uint8 (N, S, S, 3) tower inputs: one S x S image (single), or the base
    image then the tiles in row-major order (anyres)."""
    S = config.vision.image_size
    if config.image.anyres:
        p = anyres.tiling(picture.info.size, config.image, S, config.vision.grid)
        return anyres.tile_pixels(picture.image, p, config.image.resample)
    return resize_frame(picture.pixels, S)[None]


def encode_image(model, picture: Picture, **kw) -> VisualTokens:
    """A decoded picture -> VisualTokens (`encode_image_steps`, all at once)."""
    return run(encode_image_steps(model, picture, **kw))


def encode_image_steps(model, picture: Picture, *, vision=None, batch_size: int = VISION_BATCH,
                       progress: Optional[Callable[[int, int], None]] = None
                       ) -> Steps[VisualTokens]:
    """A decoded picture -> VisualTokens, a step per batch of tiles: the tiles through the
    frames' own tower and projector step (`encode.encode_images_steps`; `vision` swaps the
    tower), then (anyres) unpadding, downsampling and newlines as MLX ops. `timings`:
    `frames` (decode, resize, tiles, normalize) and `vision` (tower, projector, packing)."""
    config = model.config
    if config.image.anyres and model.newline is None:
        raise ImageError(f"image.mode {config.image.mode} places an image newline but the "
                         "model has none")
    tic = time.perf_counter()
    tiles = image_pixels(picture, config)
    timings = {"decode": picture.decode_s + time.perf_counter() - tic}
    features = []

    def take(positions: list, batch: mx.array) -> None:
        mx.eval(batch)
        features.append(batch)

    yield from encode_images_steps(model, tiles, image_preprocess(config), take, vision=vision,
                                   batch_size=batch_size, total=len(tiles), progress=progress,
                                   timings=timings)
    tic = time.perf_counter()
    features = mx.concatenate(features) if len(features) > 1 else features[0]  # (N, G*G, D)
    if config.image.anyres:
        p = anyres.tiling(picture.info.size, config.image, config.vision.image_size,
                          config.vision.grid)
        tokens = anyres.pack(features, p, model.newline)
    else:
        tokens = features[0]
    mx.eval(tokens)
    expected = num_image_tokens(config, picture.info.size)
    assert tokens.shape[0] == expected, (tokens.shape, expected)
    return VisualTokens(tokens, picture_clip(picture.info, config),
                        {"frames": timings["decode"] + timings["preprocess"],
                         "vision": timings["vision"] + time.perf_counter() - tic})
