"""LLaVA-OneVision and LLaVA-Video as first-class models (issue #9), proven end to end.

Tiny `LlavaOnevisionForConditionalGeneration` models (random, sharpened so that the greedy
answer follows the video: tests/onevision_reference.py) are written in each naming a real
checkpoint has, converted by the real `sfllava convert`, and `sfllava generate --json` is
held to:
- transformers' own video path (`pixel_values_videos`: its SigLIP, projector, bilinear
  pooling, one newline, splice) for the OneVision native recipe, in every naming, tied and
  untied, including a LLaVA-NeXT file one block short of its tower;
- a torch reference of design.md §2.1 for the slowfast recipe and LLaVA-Video's recipes
  (average pooling, `grid` and `frame` newlines);
equal greedy tokens, logprobs within 5e-4 (the reference runs in float64). Each usual mistake,
switched on in the reference, changes the answer on these fixtures; `sfllava frames` shows
the sampling rule's positions and token counts; the video cache keys on the recipe.

All `sfllava` runs of the module start together in a module fixture (two at a time: most of
each run is the interpreter importing MLX), so selecting one test still runs them all.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the references are transformers models")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the fixtures are written with transformers 5's save_pretrained names (design.md §5.2 "
                "llava-hf) and call its 5.x model API", allow_module_level=True)

from tests.conftest import LOGPROB_TOL, MAX_TOKENS, QUESTION, convert_checkpoint, sfllava  # noqa: E402
from tests.onevision_reference import (  # noqa: E402
    ONEVISION_NATIVE,
    TINY_OV,
    HFVideoReference,
    Mistakes,
    RecipeReference,
    build_model,
    decoded,
    frame_positions,
    llava_video_native,
    replace_recipe,
    slowfast_recipe,
    visual_token_count,
    write_checkpoint,
)

pytestmark = pytest.mark.slow  # end-to-end runs of the tiny models against their references

MARGIN = 1e-2  # greedy top-1 vs top-2 log-probability: float32 noise cannot flip a token
GRID = TINY_OV["image_size"] // TINY_OV["patch_size"]  # 7, odd like the real 27

# The transformers models: (tied, vision_feature_layer, seed). The seeds are ones whose greedy
# answers are decisive (MARGIN) on the test video for every recipe run below.
MODELS = {
    "tied": dict(tied=True, feature_layer=-1),
    "untied": dict(tied=False, feature_layer=-1),
    "untied-layer-2": dict(tied=False, feature_layer=-2),
    "video": dict(tied=True, feature_layer=-2, seed=2),
}
# Source checkpoints: (model, naming, write_checkpoint options).
CHECKPOINTS = {
    "save_pretrained": ("tied", "save_pretrained", {}),
    "hub-2024": ("untied", "hub-2024", {}),
    "in-memory": ("untied", "in-memory", {}),
    # lmms-lab OneVision: LLaVA-NeXT names, 2 of the 3 named blocks stored, select layer -2
    "llava-next": ("untied-layer-2", "llava-next", dict(drop_last_block=True)),
    # lmms-lab LLaVA-Video: grid newline, mm_spatial_pool_mode absent (average)
    "llava-video-grid": ("video", "llava-next", dict(llava_next={"mm_newline_position": "grid"},
                                                     drop_last_block=True)),
    # frame newline, bilinear pooling; the whole tower stored (the converter drops the last block)
    "llava-video-frame": ("video", "llava-next", dict(llava_next={"mm_newline_position": "frame",
                                                                  "mm_spatial_pool_mode": "bilinear"})),
}

GRID_AVERAGE = llava_video_native("average", "grid")
FRAME_BILINEAR = llava_video_native("bilinear", "frame")

# generate runs held to transformers' video path: id -> (checkpoint, video, --num-frames; None:
# the native 32). save_pretrained's run is the first of the cache sequence below. "short" has
# 40 frames of 24 x 16 px: 64 linspace positions repeat indices, frames grow (cubic resize).
HF_RUNS = {"save_pretrained": ("save_pretrained", "main", None),
           "hub-2024": ("hub-2024", "main", 8),
           "in-memory": ("in-memory", "main", 4),
           "llava-next-short-video-64": ("llava-next", "short", 64)}
# generate runs held to the design.md §2.1 torch reference: id -> (checkpoint, --recipe,
# --num-frames, the recipe the reference computes, visual tokens counted by hand)
RECIPE_RUNS = {
    "onevision-slowfast-128": ("save_pretrained", "slowfast", None, slowfast_recipe(ONEVISION_NATIVE),
                               32 * 4 * 4 + 96 * 2 * 2 + 1),
    "llava-video-grid-average-native-64": ("llava-video-grid", "native", None, GRID_AVERAGE,
                                           64 * 3 * (3 + 1)),
    "llava-video-grid-slowfast-32": ("llava-video-grid", "slowfast", 32,
                                     replace_recipe(slowfast_recipe(GRID_AVERAGE), num_frames=32),
                                     8 * 3 * (3 + 1) + 24 * 1 * (1 + 1)),
    "llava-video-frame-bilinear-native-16": ("llava-video-frame", "native", 16,
                                             replace_recipe(FRAME_BILINEAR, num_frames=16),
                                             16 * (4 * 4 + 1)),
}
# sfllava frames runs: id -> (checkpoint, --recipe, the recipe, visual tokens by hand)
FRAMES_RUNS = {
    "onevision-native": ("save_pretrained", "native", ONEVISION_NATIVE, 32 * 16 + 1),
    "onevision-slowfast": ("save_pretrained", "slowfast", slowfast_recipe(ONEVISION_NATIVE),
                           32 * 16 + 96 * 4 + 1),
    "llava-video-native": ("llava-video-grid", "native", GRID_AVERAGE, 64 * 12),
}


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ov(work):
    """{checkpoint: {model, src, dst}}: the transformers model (float32, in memory), its
    source checkpoint and the real converter's float32 output."""
    models = {name: build_model(**kw) for name, kw in MODELS.items()}
    out = {}
    for name, (model, naming, options) in CHECKPOINTS.items():
        src = write_checkpoint(models[model], work / f"ov-src-{name}", naming, **options)
        dst = convert_checkpoint(src, work / f"ov-mlx-{name}", "--dtype", "float32")
        out[name] = dict(model=models[model], src=src, dst=dst)
    return out


def _json_run(args, tmp):
    r = sfllava(args, tmp, timeout=600)
    assert r.returncode == 0, f"sfllava {' '.join(map(str, args))} failed:\n{r.stderr}"
    return json.loads(r.stdout)


def _generate_args(dst, video, recipe=None, num_frames=None, cache=False):
    args = ["generate", "--model", dst, "--video", video, "--prompt", QUESTION,
            "--max-tokens", MAX_TOKENS, "--json"]
    if recipe:
        args += ["--recipe", recipe]
    if num_frames:
        args += ["--num-frames", num_frames]
    return args + ([] if cache else ["--no-cache"])


@pytest.fixture(scope="module")
def runs(ov, videos, work):
    """Every `sfllava` run of the module, started at once: {id: Future of its JSON}."""
    main = videos["main"]
    cache_home = work / "ov-cache"  # XDG_CACHE_HOME of the cache sequence: empty at first
    sp = ov["save_pretrained"]["dst"]

    def cache_sequence():
        # native, then slowfast on the same video (a different key: a miss), then slowfast again
        return [_json_run(_generate_args(sp, main, recipe, cache=True), cache_home)
                for recipe in ("native", "slowfast", "slowfast")]

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {"cache": pool.submit(cache_sequence)}
    for rid, (name, video, frames) in HF_RUNS.items():
        if rid != "save_pretrained":
            futures[rid] = pool.submit(_json_run, _generate_args(ov[name]["dst"], videos[video], "native",
                                                                 frames), work)
    for rid, (name, recipe, frames, _, _) in RECIPE_RUNS.items():
        if rid != "onevision-slowfast-128":
            futures[rid] = pool.submit(_json_run, _generate_args(ov[name]["dst"], main, recipe, frames), work)
    for rid, (name, recipe, _, _) in FRAMES_RUNS.items():
        futures["frames:" + rid] = pool.submit(
            _json_run, ["frames", main, "--model", ov[name]["dst"], "--recipe", recipe, "--json"], work)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def generate_result(runs, rid):
    if rid == "save_pretrained":
        return runs["cache"].result()[0]
    if rid == "onevision-slowfast-128":
        return runs["cache"].result()[1]
    return runs[rid].result()


class References:
    """The float64 torch references per checkpoint, built once, answers memoized."""

    def __init__(self, ov):
        self.ov = ov
        self._refs, self._answers = {}, {}

    def _ref(self, kind, name):
        if (kind, name) not in self._refs:
            c = self.ov[name]
            self._refs[kind, name] = (HFVideoReference(c["model"], c["src"]) if kind == "hf" else
                                      RecipeReference(c["model"], c["src"],
                                                      c["model"].config.vision_feature_layer))
        return self._refs[kind, name]

    def hf(self, name, video, num_frames=None):
        key = ("hf", name, str(video), num_frames)
        if key not in self._answers:
            self._answers[key] = self._ref("hf", name).answer(video, QUESTION, MAX_TOKENS, num_frames or 32)
        return self._answers[key]

    def recipe(self, name, video, recipe, mistakes=Mistakes()):
        key = ("recipe", name, str(video), json.dumps(recipe, sort_keys=True), mistakes)
        if key not in self._answers:
            self._answers[key] = self._ref("recipe", name).answer(video, QUESTION, MAX_TOKENS, recipe,
                                                                  mistakes)
        return self._answers[key]


@pytest.fixture(scope="module")
def refs(ov):
    return References(ov)


def assert_same_answer(got: dict, want, what: str) -> float:
    assert want.tokens, f"{what}: the reference answer is empty: the fixture decides nothing"
    assert min(want.margins) > MARGIN, f"{what}: reference margins {want.margins}: not decisive"
    assert got["tokens"] == want.tokens, f"{what}: tokens {got['tokens']} != reference {want.tokens}"
    diff = float(np.abs(np.array(got["logprobs"]) - np.array(want.logprobs)).max())
    print(f"{what}: {len(want.tokens)} tokens, max |logprob diff| = {diff:.3g}")  # shown with -s
    assert diff <= LOGPROB_TOL, f"{what}: max |logprob difference| = {diff:.3g}"
    assert got["visual_tokens"] == want.visual_tokens
    assert got["prompt_tokens"] == want.prompt_tokens
    return diff


# ---------------------------------------------------------------------------------------
# The native OneVision recipe against transformers' own video path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", HF_RUNS)
def test_generate_matches_transformers_video_path(rid, ov, runs, refs, videos):
    name, video, frames = HF_RUNS[rid]
    got = generate_result(runs, rid)
    want = refs.hf(name, videos[video], frames)
    assert want.visual_tokens == (frames or 32) * 4 * 4 + 1  # 7x7 -> bilinear 4x4, one newline
    assert got["recipe"] == "native"
    assert_same_answer(got, want, f"{rid} ({frames or 32} frames) vs transformers")


@pytest.mark.parametrize("name,frames", [("save_pretrained", None), ("llava-next", 8)])
def test_recipe_reference_is_transformers_video_path(name, frames, refs, videos):
    """The design.md §2.1 torch reference, on the OneVision native recipe, is transformers' video
    path (so the recipe tests below hold the slowfast and LLaVA-Video recipes to the same
    semantics): the same tokens, logprobs equal to float64 rounding."""
    recipe = replace_recipe(ONEVISION_NATIVE, num_frames=frames or 32)
    a, b = refs.recipe(name, videos["main"], recipe), refs.hf(name, videos["main"], frames)
    assert a.tokens == b.tokens and a.visual_tokens == b.visual_tokens
    assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() < 1e-9


# ---------------------------------------------------------------------------------------
# slowfast and LLaVA-Video recipes against the design.md §2.1 torch reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", RECIPE_RUNS)
def test_recipe_matches_torch_reference(rid, runs, refs, videos):
    name, recipe_flag, _, recipe, n_visual = RECIPE_RUNS[rid]
    got = generate_result(runs, rid)
    want = refs.recipe(name, videos["main"], recipe)
    assert visual_token_count(GRID, recipe) == want.visual_tokens == n_visual
    assert got["recipe"] == recipe_flag
    assert_same_answer(got, want, rid)


# ---------------------------------------------------------------------------------------
# The fixtures see the video and catch the usual mistakes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,recipe", [("save_pretrained", ONEVISION_NATIVE),
                                         ("llava-video-grid", GRID_AVERAGE)],
                         ids=["onevision-native", "llava-video-native"])
def test_answer_follows_the_video(name, recipe, refs, videos):
    right = refs.recipe(name, videos["main"], recipe)
    other = refs.recipe(name, videos["other"], recipe)
    assert other.tokens != right.tokens


MISTAKES = {
    # OneVision native (one newline after the video, bilinear 7 -> 4, linspace, layer -1)
    "onevision:newline-missing": ("save_pretrained", ONEVISION_NATIVE, Mistakes(newline="none")),
    "onevision:newline-before-video": ("save_pretrained", ONEVISION_NATIVE, Mistakes(newline="first")),
    "onevision:newline-after-each-frame": ("save_pretrained", ONEVISION_NATIVE, Mistakes(newline="frame")),
    "onevision:average-instead-of-bilinear": ("save_pretrained", ONEVISION_NATIVE,
                                              Mistakes(pool_mode="average")),
    "onevision:post-layernorm": ("save_pretrained", ONEVISION_NATIVE, Mistakes(post_layernorm=True)),
    "onevision:midpoint-instead-of-linspace": ("save_pretrained", ONEVISION_NATIVE,
                                               Mistakes(frame_positions="midpoint")),
    "onevision:wrong-feature-layer": ("save_pretrained", ONEVISION_NATIVE, Mistakes(feature_layer=-2)),
    # OneVision slowfast (128 midpoint frames): linspace positions instead
    "onevision-slowfast:linspace-instead-of-midpoint": (
        "save_pretrained", slowfast_recipe(ONEVISION_NATIVE), Mistakes(frame_positions="linspace")),
    # LLaVA-Video native (a newline after each row, average 7 -> 3, layer -2 of 3)
    "llava-video:newline-missing": ("llava-video-grid", GRID_AVERAGE, Mistakes(newline="none")),
    "llava-video:newline-per-frame-not-per-row": ("llava-video-grid", GRID_AVERAGE,
                                                  Mistakes(newline="frame")),
    "llava-video:bilinear-instead-of-average": ("llava-video-grid", GRID_AVERAGE,
                                                Mistakes(pool_mode="bilinear")),
    "llava-video:post-layernorm": ("llava-video-grid", GRID_AVERAGE, Mistakes(post_layernorm=True)),
    "llava-video:last-block-not-the-stored-one": ("llava-video-grid", GRID_AVERAGE,
                                                  Mistakes(feature_layer=-1)),
}
RUN_OF = {("save_pretrained", json.dumps(ONEVISION_NATIVE, sort_keys=True)): "save_pretrained",
          ("save_pretrained", json.dumps(slowfast_recipe(ONEVISION_NATIVE), sort_keys=True)):
              "onevision-slowfast-128",
          ("llava-video-grid", json.dumps(GRID_AVERAGE, sort_keys=True)):
              "llava-video-grid-average-native-64"}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistake_changes_the_answer(mistake, runs, refs, videos):
    name, recipe, m = MISTAKES[mistake]
    right = refs.recipe(name, videos["main"], recipe)
    wrong = refs.recipe(name, videos["main"], recipe, m)
    assert wrong.tokens != right.tokens, f"{mistake} does not change the answer: the fixture is blind to it"
    got = generate_result(runs, RUN_OF[name, json.dumps(recipe, sort_keys=True)])
    assert got["tokens"] == right.tokens


# ---------------------------------------------------------------------------------------
# sfllava frames, and the video cache
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rid", FRAMES_RUNS)
def test_frames_json_follows_the_recipe(rid, runs, videos):
    _, recipe_flag, recipe, n_visual = FRAMES_RUNS[rid]
    got = runs["frames:" + rid].result()
    n = len(decoded(videos["main"]))
    assert n == 160
    want = frame_positions(n, recipe["num_frames"], recipe["frame_positions"])
    assert [f["index"] for f in got["frames"]] == want
    other = "midpoint" if recipe["frame_positions"] == "linspace" else "linspace"
    assert want != frame_positions(n, recipe["num_frames"], other)  # the rules differ here
    streams = ["slow" if i % recipe["slow_every"] == 0 else "fast" for i in range(recipe["num_frames"])]
    assert [f["stream"] for f in got["frames"]] == streams
    assert got["visual_tokens"] == visual_token_count(GRID, recipe) == n_visual


def test_video_cache_keys_on_the_recipe(runs):
    native, slowfast, again = runs["cache"].result()
    assert [r["cache"] for r in (native, slowfast, again)] == ["miss", "miss", "hit"]
    assert (native["visual_tokens"], slowfast["visual_tokens"]) == (32 * 16 + 1, 32 * 16 + 96 * 4 + 1)
    assert again["visual_tokens"] == slowfast["visual_tokens"]
    assert again["tokens"] == slowfast["tokens"] and again["tokens"]
    assert np.abs(np.array(again["logprobs"]) - np.array(slowfast["logprobs"])).max() <= 1e-5


# ---------------------------------------------------------------------------------------
# The Core ML backend's slow-first overlapped prefill keeps the recipe's token order
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,recipe", [("save_pretrained", "slowfast"), ("llava-video-grid", "slowfast"),
                                         ("llava-video-frame", "native")],
                         ids=["one_token", "grid", "frame"])
def test_overlapped_prefill_places_the_newlines(name, recipe, ov):
    """`overlap.encode_overlapped` fed to `Conversation.prefill_prefix_beside` (slow frames
    encoded and prefilled first, chunk by chunk, each chunk with its own row/frame newlines,
    the one_token newline last) leaves the visual tokens, KV cache and answer that
    `encode_frames` + `prefill_prefix` leave. The backend is faked with the MLX tower's own features (Core ML predicts only on macOS)."""
    import mlx.core as mx

    from sfllava_mlx import load
    from sfllava_mlx.conversation import Conversation
    from sfllava_mlx.encode import VisualTokens, encode_frames
    from sfllava_mlx.overlap import encode_overlapped
    from sfllava_mlx.preprocess import preprocess
    from tests.test_coreml import StandInTower, frames_of

    model, tokenizer = load(ov[name]["dst"])
    s = model.config.recipe(recipe, 8)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(s.num_frames)]
    pixels = np.asarray(preprocess(images, model.config.preprocess))
    table = {p.tobytes(): f for p, f in zip(pixels, np.asarray(model.vision_tower(mx.array(pixels))))}

    def encode(batch):  # called on a worker thread: a table lookup, no MLX there
        return np.stack([table[p.tobytes()] for p in batch])

    expected = Conversation(model, tokenizer, VisualTokens(encode_frames(model, images, s), None))
    expected.prefill_prefix()
    conv = Conversation(model, tokenizer, None, prefill_step=64)
    tower = StandInTower(encode, 3)
    tokens = conv.prefill_prefix_beside(
        lambda feed: encode_overlapped(model, frames_of(images), tower, s, feed)).embeddings
    assert tokens.shape == expected.visual.embeddings.shape
    assert float(mx.abs(tokens - expected.visual.embeddings).max()) <= 1e-5
    assert conv.offset == expected.offset
    n = conv.offset
    for a, b in zip(conv.cache, expected.cache):
        assert float(mx.abs(a.keys[..., :n, :] - b.keys[..., :n, :]).max()) <= 1e-4
        assert float(mx.abs(a.values[..., :n, :] - b.values[..., :n, :]).max()) <= 1e-4
    assert ([r.token for r in conv.ask(QUESTION, max_tokens=MAX_TOKENS)]
            == [r.token for r in expected.ask(QUESTION, max_tokens=MAX_TOKENS)])


# ---------------------------------------------------------------------------------------
# The library API (design.md §6.2): one Engine, Sessions of either recipe, each exact
# ---------------------------------------------------------------------------------------


def test_api_sessions_of_both_recipes_match_their_references(ov, refs, videos):
    """Native and slowfast Sessions on one Engine, their turns interleaved: native is
    transformers' video path, slowfast the design.md §2.1 reference, and opening slowfast leaves
    the native Session (and the model) as they were."""
    from sfllava_mlx import Engine

    engine = Engine(ov["save_pretrained"]["dst"])
    sessions = {r: engine.open(videos["main"], recipe=r, cache=False) for r in ("native", "slowfast")}
    got = {}
    for recipe in ("slowfast", "native"):
        for _ in sessions[recipe].ask(QUESTION, max_tokens=MAX_TOKENS):
            pass
        got[recipe] = sessions[recipe].record()
    assert got["native"]["recipe"] == "native" and got["slowfast"]["recipe"] == "slowfast"
    assert_same_answer(got["native"], refs.hf("save_pretrained", videos["main"]), "API native")
    assert_same_answer(got["slowfast"], refs.recipe("save_pretrained", videos["main"],
                                                    slowfast_recipe(ONEVISION_NATIVE)),
                       "API slowfast")
    assert sessions["slowfast"].training_free and not sessions["native"].training_free
    assert engine.model.config.recipe("native") == engine.model.config.recipes["native"]
