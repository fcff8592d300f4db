"""Pictures and references for tests/test_image.py (design.md §2.3), never touching the MLX code:

- `TINY_PINPOINTS` and `onevision_checkpoint`: the tiny LLaVA-OneVision of
  tests/onevision_reference.py (imported, not copied) with an any-resolution grid scaled to
  its 28 px tiles (1..6 tiles a side, as the real 384 px grid), in config.json and in the
  image processor's preprocessor_config.json;
- `HFImageReference`: transformers' own image path — `LlavaOnevisionImageProcessorPil` on the
  picture (as PIL opens it, EXIF orientation applied), `LlavaOnevisionForConditionalGeneration`
  with `pixel_values` / `image_sizes` and `<image>` placeholders, greedy decoding (float64);
- `single_reference`: design.md §2.3's `single` for SF-LLaVA-1.5 on tests/reference.py's torch
  pipeline (cv2 resize to S x S, its tower, projector, no pooling);
- picture makers: deterministic pictures, EXIF-rotated JPEGs with upright twins, and the
  bad files (truncated JPEG, text named .png, 0x0 PNG, 30000 x 30000 PNG).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from sfllava_convert.tiny.pictures import picture_array
from tests.onevision_reference import (
    IMAGE_TOKEN,
    TINY_OV,
    _greedy,
    _Text,
    build_model,
    float64_copy,
    write_checkpoint,
)
from tests.reference import Answer

S = TINY_OV["image_size"]  # 28 px tiles, patch 4: G = 7
TINY_PINPOINTS = [[S * i, S * j] for i in range(1, 7) for j in range(1, 7)]


def onevision_checkpoint(dst: Path, *, seed: int = 0):
    """(transformers model, source dir): the tiny OneVision with TINY_PINPOINTS."""
    model = build_model(tied=True, feature_layer=-1, seed=seed)
    model.config.image_grid_pinpoints = TINY_PINPOINTS  # pack_image_features reads it
    write_checkpoint(model, dst, "save_pretrained")
    pre_path = dst / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text())
    pre.update(image_grid_pinpoints=TINY_PINPOINTS, resample=3)  # 3: Pillow's BICUBIC
    pre_path.write_text(json.dumps(pre, indent=2))
    return model, dst


# ---------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------


def save_picture(path: Path, array: np.ndarray, fmt: str = "PNG", **options) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path, fmt, **options)
    return path


# Stored pixels -> what a viewer shows, per EXIF orientation (written from the EXIF spec,
# not from Pillow): 3 rotate 180, 5 transpose, 6 rotate 90 clockwise, 8 rotate 90 anticlockwise.
DISPLAYED = {3: lambda a: a[::-1, ::-1], 5: lambda a: a.transpose(1, 0, 2),
             6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1)}
STORED = {3: lambda a: a[::-1, ::-1], 5: lambda a: a.transpose(1, 0, 2),
          6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def exif_rotated_pair(dst: Path, upright: np.ndarray, orientation: int) -> tuple[Path, Path]:
    """(JPEG holding the picture turned, with an EXIF orientation that turns it back; its
    upright twin as PNG: the JPEG's own decoded pixels turned by DISPLAYED)."""
    from PIL import Image

    jpeg = dst / f"exif-{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(
        jpeg, "JPEG", quality=92, exif=exif.tobytes())
    with Image.open(jpeg) as im:
        stored = np.asarray(im.convert("RGB"))  # decoded, orientation not applied
    twin = save_picture(dst / f"exif-{orientation}-upright.png",
                        np.ascontiguousarray(DISPLAYED[orientation](stored)))
    return jpeg, twin


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int = 1, color: int = 0) -> bytes:
    """A valid grey PNG of any size, all black, written row by row (a 30000 x 30000 one
    at 1 bit a pixel is 112 MB of pixel data, ~0.1 MB compressed)."""
    row = b"\0" + bytes(-(-width * bit_depth // 8))
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def bad_pictures(dst: Path) -> dict:
    """{name: path} of files `--image` must refuse with one line."""
    dst.mkdir(parents=True, exist_ok=True)
    good = save_picture(dst / "good.jpg", picture_array(64, 48), "JPEG", quality=90)
    data = good.read_bytes()
    out = {"truncated-jpeg": dst / "truncated.jpg", "text-named-png": dst / "notes.png",
           "zero-png": dst / "zero.png", "huge-png": dst / "huge.png"}
    out["truncated-jpeg"].write_bytes(data[: len(data) // 2])
    out["text-named-png"].write_text("this is not a picture\n")
    out["zero-png"].write_bytes(png_bytes(0, 0))
    out["huge-png"].write_bytes(png_bytes(30000, 30000))
    return out


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------


def open_upright(path):
    """The picture as a transformers user hands it over: PIL, EXIF orientation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im)


class HFImageReference:
    """transformers' LLaVA-OneVision image path: the PIL processor read from the source
    checkpoint's preprocessor_config.json, the model in float64."""

    def __init__(self, model, source_dir):
        from transformers import LlavaOnevisionImageProcessorPil

        self.model = float64_copy(model)
        self.processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(source_dir))
        self.text = _Text(source_dir)

    def inputs(self, path) -> dict:
        return self.processor(images=[open_upright(path)], return_tensors="pt")

    @torch.no_grad()
    def visual_tokens(self, path) -> torch.Tensor:
        x = self.inputs(path)
        out = self.model.model.get_image_features(
            x["pixel_values"].double(), x["image_sizes"], vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy="full", batch_num_images=torch.tensor([1]))
        return out.pooler_output[0]

    @torch.no_grad()
    def answer(self, path, question: str, max_tokens: int) -> Answer:
        x = self.inputs(path)
        n_visual = self.visual_tokens(path).shape[0]
        before, after = self.text.pieces(question)
        ids = torch.tensor([before + [IMAGE_TOKEN] * n_visual + after])
        out = self.model(input_ids=ids, pixel_values=x["pixel_values"].double(),
                         image_sizes=x["image_sizes"], batch_num_images=torch.tensor([1]),
                         use_cache=True)
        state = {"cache": out.cache}

        def step(tok):
            o = self.model(input_ids=torch.tensor([[tok]]), cache=state["cache"], use_cache=True)
            state["cache"] = o.cache
            return o.logits[0, -1]

        ans = _greedy(step, out.logits[0, -1], max_tokens, self.text.end_ids, self.text.tokenizer)
        ans.prompt_tokens = ids.shape[1]
        ans.visual_tokens = n_visual
        return ans


@torch.no_grad()
def single_visual_tokens(reference, path) -> torch.Tensor:
    """design.md §2.3 `single` on tests/reference.py's torch pipeline: (G*G, D)."""
    rgb = np.asarray(open_upright(path).convert("RGB"))
    feats = reference.vision_features(reference.preprocess([rgb]))
    return reference.project(feats)[0]


def single_answer(reference, path, question: str, max_tokens: int) -> Answer:
    visual = single_visual_tokens(reference, path)
    ans = reference.greedy(reference.prompt_embeddings(visual, question), max_tokens)
    ans.visual_tokens = visual.shape[0]
    return ans
