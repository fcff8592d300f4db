"""Pictures (issue #13, design.md §2.3): `--image`, `chat` on a picture, OneVision's anyres exactly.

- A tiny `LlavaOnevisionForConditionalGeneration` (random, sharpened: tests/onevision_reference.py)
  with a 28 px any-resolution grid, converted by the real converter: for pictures of several
  sizes and shapes (square, wide, tall, one over 9 tiles, one smaller than a tile) the runtime
  gives the same pixels as transformers' `LlavaOnevisionImageProcessorPil`, the same visual
  tokens as the model's `get_image_features`, and the same greedy answer (tokens equal,
  logprobs within 5e-4 of float64) as the model on the processor's output.
- `single` for SF-LLaVA-1.5 checkpoints against the torch reference of tests/reference.py.
- EXIF-rotated JPEGs give exactly their upright twins' tokens; WebP and HEIC are read.
- Bad pictures are refused with one line and exit 2; the persistent cache keys pictures by
  content, so a second `chat` on a picture starts from the cache.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sfllava_convert.tiny.pictures import picture_array
from tests.conftest import FOLLOW_UP, LOGPROB_TOL, MAX_TOKENS, QUESTION, convert_checkpoint, sfllava
from tests.onevision_reference import IMAGE_MEAN, IMAGE_STD, TINY_OV
from tests.test_image_support import (
    DISPLAYED,
    TINY_PINPOINTS,
    HFImageReference,
    bad_pictures,
    exif_rotated_pair,
    onevision_checkpoint,
    save_picture,
    single_answer,
    single_visual_tokens,
)

MARGIN = 1e-2
S = TINY_OV["image_size"]
G = S // TINY_OV["patch_size"]  # 7
# name -> (width, height, seed). Each is the case its name says (checked in test_onevision_picture).
PICTURES = {
    "square": (100, 100, 0),  # 4 x 4 tiles, downsampled
    "wide": (200, 60, 1),  # 2 x 6 tiles, padding rows cut, not downsampled
    "tall": (45, 150, 2),  # 6 x 2 tiles, padding columns cut
    "many-tiles": (170, 160, 3),  # 6 x 6 = 36 tiles (more than 9), cut and downsampled
    "small": (20, 15, 4),  # smaller than one 28 px tile
}


def open_session(loaded, path, **options):
    """A Session through the library API, the persistent cache off."""
    from sfllava_mlx import Engine

    return Engine(*loaded).open(str(path), cache=False, max_tokens=MAX_TOKENS, **options)


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ov(work):
    model, src = onevision_checkpoint(work / "img-ov-src")
    dst = convert_checkpoint(src, work / "img-ov-mlx", "--dtype", "float32")
    return dict(model=model, src=src, dst=dst)


@pytest.fixture(scope="module")
def pictures(work):
    d = work / "pictures"
    d.mkdir(exist_ok=True)
    return {name: save_picture(d / f"{name}.png", picture_array(w, h, seed))
            for name, (w, h, seed) in PICTURES.items()}


@pytest.fixture(scope="module")
def cli(ov, pictures, work):
    """The module's `sfllava` runs, started at once beside the in-process work."""
    dst = ov["dst"]
    cache_home = work / "img-cache"

    def run_json(args, tmp, stdin=None):
        r = sfllava(args, tmp, stdin=stdin, timeout=300)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()], r.stderr

    def chat_twice():
        args = ["chat", pictures["square"], "--model", dst, "--json", "--max-tokens", MAX_TOKENS]
        stdin = f"{QUESTION}\n{FOLLOW_UP}\n"
        return [run_json(args, cache_home, stdin) for _ in range(2)]

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {
        "chat": pool.submit(chat_twice),
        "generate": pool.submit(run_json, ["generate", "--model", dst, "--image", pictures["wide"],
                                           "--prompt", QUESTION, "--max-tokens", MAX_TOKENS,
                                           "--json", "--no-cache", "--fps", "2"], work),
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def mlx_ov(ov):
    from sfllava_mlx import load

    return load(ov["dst"])


@pytest.fixture(scope="module")
def hf(ov):
    return HFImageReference(ov["model"], ov["src"])


@pytest.fixture(scope="module")
def hf_answers(hf, pictures):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf.answer(pictures[name], QUESTION, MAX_TOKENS)
        return cache[name]

    return get


def ask(opened, question=QUESTION):
    for _ in opened.ask(question, max_tokens=MAX_TOKENS):
        pass
    return opened.last_turn


def assert_same_answer(tokens, logprobs, want, what):
    assert want.tokens, f"{what}: the reference answer is empty"
    assert min(want.margins) > MARGIN, f"{what}: reference margins {want.margins}: not decisive"
    assert tokens == want.tokens, f"{what}: tokens {tokens} != reference {want.tokens}"
    diff = float(np.abs(np.array(logprobs) - np.array(want.logprobs)).max())
    print(f"{what}: {len(tokens)} tokens, max |logprob diff| = {diff:.3g}")
    assert diff <= LOGPROB_TOL, f"{what}: max |logprob difference| {diff:.3g}"


# ---------------------------------------------------------------------------------------
# The converter and the geometry
# ---------------------------------------------------------------------------------------


def test_converter_writes_image_section(ov, converted):
    image = json.loads((ov["dst"] / "config.json").read_text())["image"]
    assert image["mode"] == "anyres_max_9"  # transformers' vision_aspect_ratio default
    assert image["grid_pinpoints"] == TINY_PINPOINTS
    assert image["resample"] == "bicubic"
    # the image processor's normalization, not the video processor's
    assert image["image_mean"] == IMAGE_MEAN and image["image_std"] == IMAGE_STD
    for layout, path in converted.items():  # SF-LLaVA-1.5: single
        assert json.loads((path / "config.json").read_text())["image"]["mode"] == "single", layout
    # a model converted before pictures existed (no image section) reads as single
    from sfllava_mlx.config import ModelConfig

    d = json.loads((ov["dst"] / "config.json").read_text())
    del d["image"]
    assert ModelConfig.from_dict(d).image.mode == "single"


def test_image_section_of_other_configs():
    from sfllava_mlx.checkpoints.layouts import configs as layouts
    from sfllava_mlx.config import PreprocessConfig, VisionConfig

    v, pre = VisionConfig(image_size=384, patch_size=14), PreprocessConfig()
    # LLaVA-NeXT (lmms-lab): image_aspect_ratio, pinpoints as a tile range
    c = layouts.image_config(layouts.SIGLIP, {"image_aspect_ratio": "anyres_max_9",
                                              "image_grid_pinpoints": "(1x1),...,(6x6)"},
                             "llava-onevision", v, pre, None)
    assert c.mode == "anyres_max_9" and len(c.grid_pinpoints) == 36
    assert c.grid_pinpoints[1] == [384, 768] and c.grid_pinpoints[-1] == [2304, 2304]
    # a recipe the runtime does not compute falls back to single
    assert layouts.image_config(layouts.SIGLIP, {"image_aspect_ratio": "pad"}, "llava-video", v,
                                pre, None).mode == "single"
    # and so does a grid that does not tile the tower's frames: the video path still converts
    assert layouts.image_config(layouts.HF, {"image_grid_pinpoints": [[384, 500]]},
                                "llava-onevision", v, pre, None).mode == "single"


def test_anyres_geometry_matches_transformers():
    """Token counts from the size alone: equal to the LlavaOnevision processor's count, for
    the real 384 px grid and random picture sizes (1 px to 6000 px a side)."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor,
    )

    from sfllava_mlx import anyres
    from sfllava_mlx.config import ONEVISION_PINPOINTS, ImageConfig

    cfg = ImageConfig("anyres_max_9", ONEVISION_PINPOINTS)
    proc = argparse.Namespace(image_processor=argparse.Namespace(image_grid_pinpoints=ONEVISION_PINPOINTS),
                              num_image_tokens=729, vision_aspect_ratio="anyres_max_9")
    proc._get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features.__get__(proc)
    count = LlavaOnevisionProcessor._get_number_of_features.__get__(proc)
    rng = random.Random(0)
    sizes = [(1080, 1920), (1920, 1080), (1, 1), (384, 384), (6000, 1)] + [
        (rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(500)]
    for h, w in sizes:
        p = anyres.tiling((h, w), cfg, 384, 27)
        assert p.best == tuple(select_best_resolution((h, w), ONEVISION_PINPOINTS))
        assert p.num_tokens == count(h, w, 384, 384), (h, w)
    assert anyres.tiling((1080, 1920), cfg, 384, 27).num_tokens == 729 + 60 * 109


# ---------------------------------------------------------------------------------------
# LLaVA-OneVision: transformers' image path, exactly
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PICTURES))
@pytest.mark.slow
def test_onevision_picture(name, ov, mlx_ov, hf, hf_answers, pictures):
    import mlx.core as mx

    from sfllava_mlx import anyres, image

    model, tokenizer = mlx_ov
    path = pictures[name]
    w, h, _ = PICTURES[name]
    p = anyres.tiling((h, w), model.config.image, S, G)
    case = {"square": p.downsampled and p.tiles == (4, 4),
            "wide": p.unpadded[0] < p.tiles[0] * G and not p.downsampled,
            "tall": p.unpadded[1] < p.tiles[1] * G,
            "many-tiles": p.tiles[0] * p.tiles[1] > 9 and p.downsampled,
            "small": w < S and h < S and p.tiles == (1, 1)}[name]
    assert case, f"{name}: {p}"

    # pixels: the processor's, exactly
    x = hf.inputs(path)
    picture = image.read_image(path)
    from sfllava_mlx.preprocess import preprocess

    ours = np.array(preprocess(image.image_pixels(picture, model.config),  # the encoder's own
                               image.image_preprocess(model.config)))
    theirs = x["pixel_values"][0].permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (p.num_tiles, S, S, 3)
    assert np.abs(ours - theirs).max() <= 1e-6

    # visual tokens: get_image_features' (float64), count and values
    opened = open_session(mlx_ov, path)
    assert opened.media == "image"
    got = np.array(opened.visual.embeddings.astype(mx.float32))
    want = hf.visual_tokens(path).numpy()
    assert got.shape == want.shape == (p.num_tokens, TINY_OV["hidden"])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    # the answer
    turn = ask(opened)
    assert_same_answer(turn.tokens, turn.logprobs, hf_answers(name), f"onevision {name}")
    assert turn.prompt_tokens == hf_answers(name).prompt_tokens


@pytest.mark.slow
def test_generate_image_json(cli, hf_answers):
    (rec,), stderr = cli["generate"].result()
    want = hf_answers("wide")
    assert_same_answer(rec["tokens"], rec["logprobs"], want, "generate --image wide")
    assert rec["visual_tokens"] == want.visual_tokens and rec["prompt_tokens"] == want.prompt_tokens
    assert rec["cache"] == "off" and rec["recipe"] == "anyres_max_9"
    assert "ignored for a picture (videos only): --fps" in stderr  # said, not silently
    t = rec["timings_s"]
    assert t["vision"] > 0 and t["ttft"] >= t["vision"]


@pytest.mark.slow
def test_chat_on_a_picture_and_the_cache(cli, hf_answers):
    """chat FILE on a picture (by content), a follow-up in the same conversation, and a
    second chat on the same picture starting from the persistent cache."""
    (first, _), (second, _) = cli["chat"].result()
    want = hf_answers("square")
    assert len(first) == 2 and len(second) == 2
    assert_same_answer(first[0]["tokens"], first[0]["logprobs"], want, "chat square")
    assert first[0]["cache"] == "miss" and first[0]["visual_tokens"] == want.visual_tokens
    assert first[1]["prompt_tokens"] < 40  # the follow-up prefills only its own tokens
    assert second[0]["cache"] == "hit"
    assert second[0]["tokens"] == first[0]["tokens"] and second[1]["tokens"] == first[1]["tokens"]
    t = second[0]["timings_s"]
    assert t["vision"] == 0 and t["frames"] == 0
    assert second[0]["prompt_tokens"] < 40  # the prefix (picture included) came from the cache


# ---------------------------------------------------------------------------------------
# SF-LLaVA-1.5: single
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["oryx-vit", "llava-siglip"])
def test_single_sf_llava(layout, mlx_models, references, pictures):
    import mlx.core as mx

    model, tokenizer = mlx_models[layout]
    ref = references[layout]
    assert model.config.image.mode == "single"
    path = pictures["wide"]
    opened = open_session(mlx_models[layout], path)
    got = np.array(opened.visual.embeddings.astype(mx.float32))
    want = single_visual_tokens(ref, path).float().numpy()
    assert got.shape == want.shape == (model.config.vision.num_patches, want.shape[1])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    turn = ask(opened)
    assert_same_answer(turn.tokens, turn.logprobs, single_answer(ref, path, QUESTION, MAX_TOKENS),
                       f"single {layout}")



def test_picture_opens_in_steps_of_a_tile_batch(mlx_ov, pictures):
    """A picture's tiles go through the frames' tower step a batch at a time, with a step
    after each (a server decodes other answers between them), through the `vision` it is
    given, and leave the tokens the same as opening it at once."""
    import mlx.core as mx

    from sfllava_mlx import Engine, anyres
    from sfllava_mlx.config import VISION_BATCH

    model, tokenizer = mlx_ov
    S, G = model.config.vision.image_size, model.config.vision.grid
    path = pictures["many-tiles"]  # 37 tower inputs: 5 batches of at most 8
    w, h, _ = PICTURES["many-tiles"]
    inputs = anyres.tiling((h, w), model.config.image, S, G).num_tiles
    batches = -(-inputs // VISION_BATCH)
    calls = []

    def tower(pixels):
        calls.append(pixels.shape[0])
        return model.vision_tower(pixels)

    engine = Engine(model, tokenizer)
    steps, pauses = engine.open_steps(str(path), cache=False, tower=tower), 0
    while True:
        try:
            next(steps)
            pauses += 1
        except StopIteration as done:
            stepped = done.value
            break
    assert calls == [min(VISION_BATCH, inputs - i) for i in range(0, inputs, VISION_BATCH)]
    assert pauses >= batches - 1  # a pause between one batch and the next
    whole = open_session(mlx_ov, path)
    assert mx.array_equal(stepped.visual.embeddings, whole.visual.embeddings)

# ---------------------------------------------------------------------------------------
# Decoding: orientation, formats, content detection, bad files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_rotated_jpeg_matches_upright_twin(orientation, mlx_ov, work):
    import mlx.core as mx

    from sfllava_mlx import image

    model, _ = mlx_ov
    d = work / "exif"
    d.mkdir(exist_ok=True)
    jpeg, twin = exif_rotated_pair(d, picture_array(90, 50, seed=5), orientation)
    info = image.probe(jpeg)  # the header gives the upright size (token count, cache)
    assert info.orientation == orientation and info.size == (50, 90)
    a, b = image.read_image(jpeg), image.read_image(twin)
    assert a.info.size == b.info.size == (50, 90)
    assert np.array_equal(a.pixels, b.pixels)
    ta, tb = image.encode_image(model, a), image.encode_image(model, b)
    assert np.array_equal(np.array(ta.embeddings), np.array(tb.embeddings))
    from PIL import Image

    with Image.open(jpeg) as raw:  # the orientation matters: ignoring it gives other pixels
        stored = np.asarray(raw.convert("RGB"))
    assert stored.shape != a.pixels.shape or not np.array_equal(stored, a.pixels)
    assert mx.array(ta.embeddings).shape[0] == image.num_image_tokens(model.config, info.size)


def test_formats_and_content_detection(mlx_ov, pictures, work, videos):
    from PIL import Image

    from sfllava_mlx import image

    model, tokenizer = mlx_ov
    d = work / "formats"
    d.mkdir(exist_ok=True)
    rgb = picture_array(60, 40, seed=6)
    png = save_picture(d / "pic.png", rgb)
    webp = save_picture(d / "pic.webp", rgb, "WEBP", lossless=True)
    assert image.sniff(webp) == "WEBP"
    assert np.array_equal(image.read_image(webp).pixels, image.read_image(png).pixels)
    # transparency is composited onto white, as transformers' convert_to_rgb does
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba).save(d / "alpha.png")
    assert image.read_image(d / "alpha.png").pixels.min() >= 127
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        pillow_heif = None
    if pillow_heif is not None:
        image._heif_opener()
        Image.fromarray(rgb).save(d / "pic.heic", "HEIF", quality=95)
        assert image.sniff(d / "pic.heic") == "HEIF"
        heic = image.read_image(d / "pic.heic")
        assert heic.info.size == (40, 60)  # lossy (4:2:0 on a noisy picture): near, not equal
        assert np.abs(heic.pixels.astype(int) - rgb).mean() < 16

    # by content, not by name: a PNG named .mp4 is a picture, a video named .jpg a video
    disguised = d / "picture.mp4"
    shutil.copy(png, disguised)
    opened = open_session(mlx_ov, disguised)
    assert opened.media == "image"
    video_named_jpg = d / "clip.jpg"
    shutil.copy(videos["short"], video_named_jpg)
    assert not image.is_picture(video_named_jpg)
    opened = open_session(mlx_ov, video_named_jpg)
    assert opened.media == "video"
    (d / "notes.png").write_text("not a picture, not a video\n")
    with pytest.raises(image.ImageError, match="not a picture"):
        open_session(mlx_ov, d / "notes.png")


BAD = {"truncated-jpeg": "cannot decode the picture", "text-named-png": "is not a picture",
       "zero-png": "has no pixels (0x0)", "huge-png": "too large a picture"}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_pictures_refused(name, ov, work, capsys):
    from sfllava_app.cli import main

    bad = bad_pictures(work / "bad")[name]
    tic = time.perf_counter()
    code = main(["generate", "--model", ov["dst"], "--image", bad, "--prompt", QUESTION,
                 "--no-cache", "--json"])
    elapsed = time.perf_counter() - tic
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(bad) in lines[0] and BAD[name] in lines[0], lines[0]
    assert "Traceback" not in err
    if name == "huge-png":
        assert "30000x30000" in lines[0] and elapsed < 5  # refused from the header
