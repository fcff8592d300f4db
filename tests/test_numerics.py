"""The MLX port against the independent torch reference (tests/reference.py), stage by
stage, in float32, for both source layouts: pixels, vision features, projector output,
pooled visual tokens, LLM logits for the spliced prompt, and the greedy answer of
`sfllava generate --json` / `sfllava chat --json` (tokens equal, logprobs within 5e-4).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sfllava_convert.tiny import Tower
from tests.conftest import (
    FOLLOW_UP,
    LAYOUTS,
    LOGPROB_TOL,
    MAX_TOKENS,
    QUESTION,
    json_lines,
    sfllava,
    with_image_size,
)

# float32 against float32: both sides differ only by summation order, ~1e-6 relative.
REL_TOL = 1e-4



def np_(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    return np.array(x.astype(mx.float32))


def assert_close(mlx_value, ref_value, rel=REL_TOL, what=""):
    a, b = np_(mlx_value), np_(ref_value)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != reference {b.shape}"
    scale = max(1.0, float(np.abs(b).max()))
    diff = float(np.abs(a - b).max())
    print(f"{what}: max |MLX - torch| = {diff:.3g}, scale {scale:.3g}")  # shown with -s
    assert diff <= rel * scale, f"{what}: max |MLX - torch| = {diff:.3g} (scale {scale:.3g})"


def nhwc(pixels: torch.Tensor) -> mx.array:
    return mx.array(pixels.permute(0, 2, 3, 1).contiguous().numpy())


@pytest.fixture(scope="module")
def stages(references, videos):
    """The reference's intermediate values on the main video, per layout."""
    out = {}
    for layout, ref in references.items():
        frames, idx = ref.read_frames(videos["main"])
        pixels = ref.preprocess(frames)
        feats = ref.vision_features(pixels)
        g = ref.grid
        projected = ref.project(feats).reshape(len(frames), g, g, -1)
        out[layout] = dict(frames=frames, indices=idx, pixels=pixels, features=feats,
                           projected=projected, visual=ref.slowfast(projected))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_converted_config_states_the_source(layout, converted, references):
    ref = references[layout]
    cfg = json.loads((converted[layout] / "config.json").read_text())
    vc = cfg["vision_config"]
    assert cfg["layout"] == layout
    assert vc["feature_layer"] == ref.feature_layer
    assert vc["pos_grid"] == ref.pos_grid
    assert vc["pos_interpolation"] == {"oryx-vit": "bilinear", "llava-siglip": "bicubic"}[layout]
    assert cfg["preprocess"]["image_mean"] == ref.image_mean
    assert cfg["preprocess"]["image_std"] == ref.image_std


@pytest.mark.parametrize("layout", LAYOUTS)
def test_preprocess(layout, mlx_models, references, stages):
    from sfllava_mlx.preprocess import preprocess

    model, _ = mlx_models[layout]
    s = stages[layout]
    pixels = preprocess(s["frames"], model.config.preprocess)
    assert_close(pixels, s["pixels"].permute(0, 2, 3, 1), rel=1e-6, what="pixels")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vision_features(layout, mlx_models, stages):
    model, _ = mlx_models[layout]
    s = stages[layout]
    feats = model.vision_tower(nhwc(s["pixels"]))
    assert_close(feats, s["features"], what="vision features")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_projector(layout, mlx_models, references, stages):
    model, _ = mlx_models[layout]
    feats = stages[layout]["features"]
    assert_close(model.projector(mx.array(feats.numpy())), references[layout].project(feats),
                 what="projector output")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pooled_visual_tokens(layout, mlx_models, references, stages):
    from sfllava_mlx.encode import encode_frames
    from tests.pieces import slowfast_pool

    model, _ = mlx_models[layout]
    ref, s = references[layout], stages[layout]
    # 32 slow frames at (4/2)^2 + 96 fast frames at (4/4)^2: the tiny 8064.
    assert ref.grid == 4 and s["visual"].shape[0] == 32 * 4 + 96 * 1 == ref.num_visual_tokens()
    pooled = slowfast_pool(mx.array(s["projected"].numpy()), model.config.recipe())
    assert_close(pooled, s["visual"], what="pooled tokens")
    # The runtime's own chain from RGB frames: preprocess, tower, projector, pooling.
    assert_close(encode_frames(model, s["frames"], model.config.recipe()), s["visual"],
                 what="frames -> visual tokens")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("video", ["main", "short"])
def test_encode_video_from_file(layout, video, mlx_models, references, videos):
    """The whole visual side from the file, frames decoded by the runtime's own reader.
    "short" has 40 frames for 128 positions: indices repeat, frames grow (cubic)."""
    from sfllava_mlx.encode import encode_video
    from sfllava_mlx.frames import read_frames

    model, _ = mlx_models[layout]
    ref = references[layout]
    s = model.config.recipe()
    clip = read_frames(videos[video], num_frames=s.num_frames, slow_every=s.slow_every, seek="exact")
    frames, idx = ref.read_frames(videos[video])
    assert list(clip.indices) == idx
    if video == "short":
        assert len(set(idx)) == 40 < len(idx)
    for got, want in zip(clip.images, frames):
        np.testing.assert_array_equal(np.asarray(got), want)
    visual = encode_video(model, clip, s)
    assert_close(visual.embeddings, ref.visual_tokens_from_pixels(ref.preprocess(frames)),
                 what="visual tokens")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_llm_logits_for_spliced_prompt(layout, mlx_models, references, stages):
    from tests.pieces import first_turn_tokens

    model, tokenizer = mlx_models[layout]
    ref = references[layout]
    before, after = ref.prompt_pieces(QUESTION)
    pieces = first_turn_tokens(tokenizer, model.config.prompt.system_prompt, QUESTION)
    assert (pieces.prefix, pieces.suffix) == (before, after)
    embeds = ref.prompt_embeddings(stages[layout]["visual"], QUESTION)
    want = ref.logits(embeds)
    e = mx.array(embeds.numpy())[None]
    got = model.language_model(mx.zeros((1, e.shape[1]), dtype=mx.int32), input_embeddings=e)[0]
    assert_close(got, want, what="logits")
    # The same prompt spliced by the runtime from its own pieces.
    spliced = mx.concatenate([model.embed_tokens(pieces.prefix), mx.array(stages[layout]["visual"].numpy()),
                              model.embed_tokens(pieces.suffix)])
    got = model.language_model(mx.zeros((1, spliced.shape[0]), dtype=mx.int32),
                                input_embeddings=spliced[None])[0]
    assert_close(got, want, what="logits (runtime splice)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_json_matches_reference(layout, cli_answers, reference_answers, references):
    got, want = cli_answers[layout], reference_answers[layout]
    ref = references[layout]
    assert want.tokens, "the reference answer is empty: the fixture decides nothing"
    assert got["tokens"] == want.tokens
    diff = np.abs(np.array(got["logprobs"]) - np.array(want.logprobs)).max()
    print(f"generate --json {layout}: {len(want.tokens)} tokens, max |logprob diff| = {diff:.3g}")
    assert diff <= LOGPROB_TOL, f"max |logprob difference| = {diff:.3g}"
    assert got["text"] == want.text
    nv = ref.num_visual_tokens()
    before, after = ref.prompt_pieces(QUESTION)
    assert got["visual_tokens"] == nv
    assert got["prompt_tokens"] == len(before) + nv + len(after)


@pytest.mark.parametrize("layout", ["oryx-vit"])  # the LLM side does not depend on the layout
@pytest.mark.slow
def test_chat_follow_up_matches_reference(layout, work, converted, references, videos):
    """Two questions on stdin (not a terminal): one JSON object per turn, the second turn
    continuing the same conversation (design.md §1.7 later turns, §4 non-terminal mode)."""
    ref = references[layout]
    r = sfllava(["chat", videos["main"], "--model", converted[layout], "--max-tokens", MAX_TOKENS,
                 "--json"], work, stdin=f"{QUESTION}\n{FOLLOW_UP}\n")
    assert r.returncode == 0, r.stderr
    turns = json_lines(r.stdout)
    assert len(turns) == 2
    want = ref.chat(ref.visual_tokens(videos["main"]), [QUESTION, FOLLOW_UP], MAX_TOKENS)
    for n, (got, w) in enumerate(zip(turns, want)):
        assert got["tokens"] == w.tokens
        diff = np.abs(np.array(got["logprobs"]) - np.array(w.logprobs)).max()
        print(f"chat --json turn {n + 1}: {len(w.tokens)} tokens, max |logprob diff| = {diff:.3g}")
        assert diff <= LOGPROB_TOL, f"max |logprob difference| = {diff:.3g}"
    assert turns[1]["prompt_tokens"] == len(ref.followup_ids(FOLLOW_UP))  # only its new tokens


# G != G0 (position table resized) and G not divisible by the strides (bilinear pooling):
# 40 px -> G = 5 (divisible by neither stride), 48 px -> G = 6 (by 2, not by 4); G0 = 4.
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("image_size", [40, 48])
def test_other_grid_sizes(layout, image_size, work, sources, converted, videos):
    from sfllava_mlx import load
    from sfllava_mlx.encode import encode_frames
    from tests.reference import Reference

    model_dir = with_image_size(converted[layout], work / f"mlx-{layout}-{image_size}", image_size)
    model, _ = load(model_dir)
    ref = Reference(sources[layout], image_size=image_size)
    g = image_size // Tower().patch_size
    g0 = ref.pos_grid
    assert model.config.vision.grid == ref.grid == g != ref.pos_grid

    # The check has teeth: bilinear and bicubic tables differ far beyond the tolerance.
    table = ref.tower.pos_embed if layout == "oryx-vit" else \
        ref.tower.embeddings.position_embedding.weight[None]
    t = table.detach().reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    lin = F.interpolate(t, size=(g, g), mode="bilinear", align_corners=False)
    cub = F.interpolate(t, size=(g, g), mode="bicubic", align_corners=False)
    assert float((lin - cub).abs().max()) > 100 * REL_TOL

    frames, _ = ref.read_frames(videos["main"])
    pixels = ref.preprocess(frames)
    assert_close(model.vision_tower(nhwc(pixels)), ref.vision_features(pixels),
                 what=f"vision features at G={g}")
    want = ref.visual_tokens_from_pixels(pixels)
    slow, fast = -(-g // 2), -(-g // 4)
    assert want.shape[0] == 32 * slow * slow + 96 * fast * fast
    assert_close(encode_frames(model, frames, model.config.recipe()), want,
                 what=f"visual tokens at G={g}")
