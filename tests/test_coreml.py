"""The Core ML vision tower (issue 6): export, package checks, runtime backend, overlap.

On Linux coremltools converts but cannot predict, so here the tests check what is
exported: the package's interface, float16 compute and metadata, and that the traced
torch module it was converted from equals the MLX tower (and the independent torch
reference of tests/reference.py) in float32. The Core ML predictions themselves are
checked by the macOS tests at the end, which say why they skip elsewhere.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from sfllava_mlx import __version__
from sfllava_mlx.config import ModelConfig
from sfllava_mlx.coreml_vision import (
    INPUT_NAME,
    OUTPUT_NAME,
    PACKAGE_NAME,
    PREFIX,
    check_package,
    read_package_metadata,
    vision_fingerprint,
)
from sfllava_mlx.errors import CheckpointError, UserError
from sfllava_mlx.overlap import overlap_seconds, prefill_while_encoding
from tests.conftest import LAYOUTS, MAX_TOKENS, QUESTION, with_image_size

BATCH = 4
# Frame sizes whose grid differs from the tiny checkpoints' G0 = 4: the position table
# is resized at export (bilinear for oryx-vit, bicubic for llava-siglip).
RESIZED = {"oryx-vit": 48, "llava-siglip": 24}
on_macos = pytest.mark.skipif(
    sys.platform != "darwin",
    reason="Core ML runs predictions only on macOS (coremltools converts on Linux)")


def mlx_tower(model_dir: Path):
    from sfllava_mlx.model import load_sfllava

    return load_sfllava(model_dir).vision_tower


def random_pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def assert_close(a, b, rel, what=""):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = max(1.0, float(np.abs(b).max()))
    diff = float(np.abs(a - b).max())
    assert diff <= rel * scale, f"{what}: max difference {diff:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def model_dir(work, converted) -> Path:
    """The converted oryx-vit model at 48 px frames (G = 6, G0 = 4), with its package."""
    from sfllava_convert.coreml import export

    d = with_image_size(converted["oryx-vit"], work / "coreml-oryx-48", RESIZED["oryx-vit"])
    export(d, batch_size=BATCH)
    return d


@pytest.fixture(scope="module")
def spec(model_dir):
    from sfllava_mlx.coreml_vision import import_coremltools

    return import_coremltools().utils.load_spec(str(model_dir / PACKAGE_NAME))


def main_block(spec):
    fn = spec.mlProgram.functions["main"]
    return fn.block_specializations[fn.opset]


# --- the package ------------------------------------------------------------------------


def test_package_interface(spec, model_dir):
    """One input of B frames of S x S x 3 (channels-last), one output of B x G*G x Dv."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    config = ModelConfig.read(model_dir)
    s, v = config.vision.image_size, config.vision
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 8  # macOS 14 / iOS 17
    (inp,), (out,) = spec.description.input, spec.description.output
    assert inp.name == INPUT_NAME
    assert list(inp.type.multiArrayType.shape) == [BATCH, s, s, 3]
    assert inp.type.multiArrayType.dataType == ft.ArrayFeatureType.FLOAT32
    assert out.name == OUTPUT_NAME
    assert list(out.type.multiArrayType.shape) == [BATCH, v.grid * v.grid, v.hidden_size]
    assert out.type.multiArrayType.dataType == ft.ArrayFeatureType.FLOAT16


def test_package_computes_in_float16(spec, model_dir):
    """Every compute op of the program works in float16 on the package's whole batch
    (the tower is traced on one frame: no batch of 1 may stay baked in); the blocks up to
    the feature layer are all there (one attention softmax each), and nothing beyond."""
    from coremltools.proto import MIL_pb2

    config = ModelConfig.read(model_dir)
    compute = {"conv", "linear", "matmul", "layer_norm", "softmax", "gelu", "add", "mul"}
    ops = [op for op in main_block(spec).operations if op.type in compute]
    assert ops
    for op in ops:
        for o in op.outputs:
            assert o.type.tensorType.dataType == MIL_pb2.FLOAT16, f"{op.type} computes in {o.type}"
            assert o.type.tensorType.dimensions[0].constant.size == BATCH, f"{op.type}: {o.type}"
    counts = [op.type for op in ops]
    assert counts.count("softmax") == config.vision.feature_layer
    assert counts.count("conv") == 1


def test_package_metadata(model_dir):
    config = ModelConfig.read(model_dir)
    meta = read_package_metadata(model_dir / PACKAGE_NAME)
    assert config.source, "the converter records the source model"
    assert json.loads(meta[PREFIX + "source"]) == config.source
    assert meta[PREFIX + "fingerprint"] == vision_fingerprint(model_dir)
    assert int(meta[PREFIX + "feature_layer"]) == config.vision.feature_layer
    assert int(meta[PREFIX + "batch_size"]) == BATCH
    assert int(meta[PREFIX + "image_size"]) == config.vision.image_size
    assert meta[PREFIX + "compute_precision"] == "float16"
    assert meta[PREFIX + "version"] == __version__


# --- what is exported computes the tower ---------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_traced_tower_equals_mlx_tower_and_reference(layout, work, sources, converted):
    """The module that is converted, traced (on one frame) from the converted weights,
    gives the MLX tower's features and the torch reference's (read from the source
    checkpoint) on a batch of frames in float32, at a frame size whose grid needs the
    position table resized."""
    import torch

    from sfllava_convert.coreml import build_torch_tower, read_vision_weights, trace_tower
    from tests.reference import Reference

    size = RESIZED[layout]
    d = with_image_size(converted[layout], work / f"traced-{layout}", size)
    config = ModelConfig.read(d)
    traced = trace_tower(build_torch_tower(config.vision, read_vision_weights(d)), config.vision)
    pixels = random_pixels(BATCH, size, seed=1)
    with torch.no_grad():
        ours = traced(torch.from_numpy(pixels)).numpy()
    mlx_features = mlx_tower(d)(mx.array(pixels))
    assert_close(ours, mlx_features, 1e-4, "traced vs MLX tower")
    ref = Reference(sources[layout], image_size=size)
    with torch.no_grad():
        reference = ref.vision_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert_close(ours, reference.numpy(), 1e-4, "traced vs torch reference")


def random_model_dir(path: Path, hidden_act: str, pos_interpolation: str) -> Path:
    """A converted model directory with large random weights (so that, e.g., exact and
    tanh GELU differ well above the tolerance), G0 = 6 resized to G = 4, and a feature
    layer before the last block."""
    from mlx.utils import tree_flatten, tree_map

    from sfllava_mlx.config import (
        PreprocessConfig,
        ProjectorConfig,
        PromptConfig,
        SamplingConfig,
        VisionConfig,
    )
    from sfllava_mlx.model import SFLLaVA

    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=2, image_size=32, patch_size=8, pos_grid=6,
                          hidden_act=hidden_act, pos_interpolation=pos_interpolation, feature_layer=2)
    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=True)
    config = ModelConfig(layout="oryx-vit", text_config=text, vision=vision,
                         projector=ProjectorConfig(input_size=32, hidden_size=64),
                         recipes={"native": SamplingConfig()}, preprocess=PreprocessConfig(image_size=32),
                         prompt=PromptConfig(), source={"test": "random"})
    model = SFLLaVA(config)
    mx.random.seed(7)
    model.update(tree_map(lambda p: 0.5 * mx.random.normal(p.shape), model.parameters()))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config.save(path)
    return path


@pytest.mark.parametrize("act,mode", [("gelu", "bilinear"), ("gelu_pytorch_tanh", "bicubic")])
def test_traced_tower_equals_mlx_tower_with_large_weights(tmp_path, act, mode):
    import torch

    from sfllava_convert.coreml import build_torch_tower, read_vision_weights, trace_tower

    d = random_model_dir(tmp_path / "model", act, mode)
    config = ModelConfig.read(d)
    traced = trace_tower(build_torch_tower(config.vision, read_vision_weights(d)), config.vision)
    pixels = random_pixels(3, config.vision.image_size, seed=8)
    with torch.no_grad():
        ours = traced(torch.from_numpy(pixels)).numpy()
    # float32 both sides: ~3e-7 of the scale apart; the wrong GELU is ~1e-4 apart.
    assert_close(ours, mlx_tower(d)(mx.array(pixels)), 1e-5, f"traced vs MLX tower ({act}, {mode})")


# --- errors ------------------------------------------------------------------------------


def test_export_needs_a_converted_model(tmp_path):
    from sfllava_convert.coreml import export

    with pytest.raises(CheckpointError, match="not a converted model"):
        export(tmp_path)


def test_export_without_torch_says_how_to_install_it(work, converted, monkeypatch):
    from sfllava_convert.coreml import export

    d = with_image_size(converted["oryx-vit"], work / "coreml-no-torch", 32)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(UserError, match=r"sfllava-mlx\[torch\]"):
        export(d)
    assert not (d / PACKAGE_NAME).exists()


def test_package_check(work, model_dir):
    """The runtime's check: a missing package, and one made for other weights or for
    another tower configuration, each end in one clear line."""
    config = ModelConfig.read(model_dir)
    assert check_package(model_dir, config)[PREFIX + "batch_size"] == str(BATCH)

    empty = work / "coreml-none"
    empty.mkdir()
    with pytest.raises(UserError, match=r"run `sfllava export-coreml --model"):
        check_package(empty, config)

    # Same config, other weights: one bias changed.
    other = work / "coreml-other-weights"
    shutil.copytree(model_dir, other, symlinks=False)
    weights = dict(mx.load(str(other / "model.safetensors")))
    weights["vision_tower.blocks.0.mlp.fc2.bias"] = weights["vision_tower.blocks.0.mlp.fc2.bias"] + 1
    mx.save_safetensors(str(other / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="was made for another model") as e:
        check_package(other, config)
    assert "fingerprint" in e.value.details

    # Same weights, another tower configuration.
    changed = ModelConfig.read(model_dir)
    changed.vision.layer_norm_eps = 1e-5
    with pytest.raises(CheckpointError, match="was made for another model"):
        check_package(model_dir, changed)


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message shown off macOS")
def test_coreml_backend_off_macos_is_one_clear_error(model_dir):
    from sfllava_mlx.coreml_vision import CoreMLVisionTower

    with pytest.raises(UserError, match="needs macOS: Core ML cannot run predictions on Linux"):
        CoreMLVisionTower(model_dir, ModelConfig.read(model_dir))


def test_backend_pads_the_last_batch_and_drops_the_padding():
    """The runtime's batching around a package of fixed batch 4 (a stand-in for Core ML's
    MLModel, which cannot load here): 6 frames -> calls of 4 + 4 (2 padded), 6 features."""
    from collections import deque

    from sfllava_mlx.coreml_vision import CoreMLVisionTower

    class Package:
        def __init__(self):
            self.calls = []

        def predict(self, inputs):
            x = inputs[INPUT_NAME]
            self.calls.append(x.shape)
            return {OUTPUT_NAME: features_of(x)}

    tower = CoreMLVisionTower.__new__(CoreMLVisionTower)  # what __init__ sets on a Mac
    tower.batch_size, tower.dtype, tower.mlmodel = 4, mx.float32, Package()
    tower._recent_inputs = deque(maxlen=4)
    pixels = random_pixels(6, 4, seed=6)
    out = tower(mx.array(pixels))
    assert tower.mlmodel.calls == [(4, 4, 4, 3), (4, 4, 4, 3)]
    assert out.dtype == mx.float32
    np.testing.assert_array_equal(np.array(out), features_of(pixels).astype(np.float32))


# --- the command line ---------------------------------------------------------------------


@pytest.mark.slow
def test_export_coreml_command(work, converted, capsys):
    """`sfllava export-coreml`: writes the package, refuses to replace it without
    --force, replaces it with --force, and leaves no temporary files behind."""
    import argparse

    from sfllava_app import export_coreml
    from sfllava_convert.coreml import DEFAULT_BATCH_SIZE

    d = with_image_size(converted["oryx-vit"], work / "coreml-cli", 32)
    before = {p.name for p in d.iterdir()}
    parser = argparse.ArgumentParser()
    export_coreml.add_arguments(parser)

    assert export_coreml.main(parser.parse_args(["--model", str(d), "--batch-size", "2"])) == 0
    assert capsys.readouterr().out.strip() == str(d / PACKAGE_NAME)
    assert read_package_metadata(d / PACKAGE_NAME)[PREFIX + "batch_size"] == "2"
    with pytest.raises(UserError, match="--force"):
        export_coreml.main(parser.parse_args(["--model", str(d)]))
    assert export_coreml.main(parser.parse_args(["--model", str(d), "--force"])) == 0
    assert read_package_metadata(d / PACKAGE_NAME)[PREFIX + "batch_size"] == str(DEFAULT_BATCH_SIZE)
    assert {p.name for p in d.iterdir()} == before | {PACKAGE_NAME}


def test_export_coreml_command_error_is_one_line(work, capsys):
    from sfllava_app.cli import main

    assert main(["export-coreml", "--model", str(work / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_convert_with_coreml_end_to_end(work, sources, capsys):
    """`sfllava convert --coreml` writes the model and a package that fits it."""
    from sfllava_app.cli import main

    dst = work / "converted-with-coreml"
    assert main(["convert", "--hf-path", str(sources["llava-siglip"]), "--mlx-path", str(dst),
                 "--dtype", "float32", "--coreml"]) == 0
    config = ModelConfig.read(dst)
    meta = check_package(dst, config)
    assert json.loads(meta[PREFIX + "source"]) == config.source
    # llava-siglip takes the second-to-last layer: the package stops there too.
    from sfllava_mlx.coreml_vision import import_coremltools

    assert config.vision.feature_layer < config.vision.num_hidden_layers
    spec = import_coremltools().utils.load_spec(str(dst / PACKAGE_NAME))
    ops = [op.type for op in main_block(spec).operations]
    assert ops.count("softmax") == config.vision.feature_layer


# --- slow first: encoding overlapped with prefill ---------------------------------------------


class FakeEncoder:
    """A vision backend that records when it runs. Its first fast batch waits (up to 30 s)
    for the slow prefill to start: a schedule that does not overlap them fails the test."""

    def __init__(self, n_slow: int):
        self.n_slow = n_slow
        self.events, self.lock = [], threading.Lock()
        self.slow_prefill_started = threading.Event()
        self.saw_prefill_while_encoding = None
        self.frames_seen = 0

    def log(self, *event):
        with self.lock:
            self.events.append(event)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        first_fast = self.frames_seen == self.n_slow
        self.frames_seen += len(pixels)
        self.log("encode-start", len(pixels))
        if first_fast:
            self.saw_prefill_while_encoding = self.slow_prefill_started.wait(timeout=30)
        self.log("encode-end", len(pixels))
        return features_of(pixels)


def features_of(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(len(pixels), -1, 3).astype(np.float16) * 2


def test_prefill_of_slow_tokens_starts_while_fast_frames_encode():
    slow, fast = random_pixels(8, 4, seed=2), random_pixels(24, 4, seed=3)
    enc = FakeEncoder(len(slow))
    got = {"slow": [], "fast": []}

    def prefill(features, stream):
        if stream == "slow":
            enc.slow_prefill_started.set()
        enc.log("prefill", stream, features.shape[0])
        got[stream].append(np.array(features))

    timeline = prefill_while_encoding(enc, slow, fast, prefill, batch_size=4)
    assert enc.saw_prefill_while_encoding, \
        "the slow prefill did not start before the fast frames were encoded"
    assert len(got["slow"]) == 1  # all slow tokens in one prefill, before any fast one
    np.testing.assert_array_equal(got["slow"][0], features_of(slow))
    np.testing.assert_array_equal(np.concatenate(got["fast"]), features_of(fast))  # in order
    order = [e[0] for e in enc.events]
    assert order.index("prefill") < len(order) - 1 - order[::-1].index("encode-end")
    assert len(timeline.vision) == 8 and len(timeline.prefill) == 1 + len(got["fast"])
    assert timeline.overlap_s > 0  # the gated fast batch was busy during the slow prefill


def test_encoder_error_reaches_the_caller():
    def encode(pixels):
        if encode.calls == 2:
            raise RuntimeError("Neural Engine unavailable")
        encode.calls += 1
        return features_of(pixels)

    encode.calls = 0
    with pytest.raises(RuntimeError, match="Neural Engine unavailable"):
        prefill_while_encoding(encode, random_pixels(4, 4), random_pixels(12, 4), lambda f, s: None, 4)


def test_overlap_seconds():
    assert overlap_seconds([(0, 2), (3, 5)], [(1, 4)]) == pytest.approx(2.0)
    assert overlap_seconds([(0, 1)], [(1, 2)]) == 0.0
    assert overlap_seconds([], [(0, 1)]) == 0.0


class StandInTower:
    """Core ML's interface (numpy `encode`, a fixed batch) in front of a lookup table."""

    def __init__(self, encode, batch_size):
        self.encode, self.batch_size = encode, batch_size


def frames_of(images):
    from sfllava_mlx.frames import SampledFrames

    n = len(images)
    return SampledFrames(images, list(range(n)), [i / 25 for i in range(n)], [], True, [], None)


def test_overlapped_prefill_gives_the_same_cache_and_answer(mlx_models):
    """Slow-first encoding with chunked prefill leaves the cache that encode_video +
    Conversation.prefill_prefix leave, and the same greedy answer follows."""
    from sfllava_mlx.conversation import Conversation
    from sfllava_mlx.encode import VisualTokens, encode_frames
    from sfllava_mlx.overlap import encode_overlapped
    from sfllava_mlx.preprocess import preprocess

    model, tokenizer = mlx_models["oryx-vit"]
    cfg = model.config
    sampling = cfg.recipe()
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(sampling.num_frames)]

    # The fake backend returns the MLX tower's own features, computed here on this thread
    # (a worker thread must not touch MLX), looked up by the pixels it is given.
    pixels = np.asarray(preprocess(images, cfg.preprocess))
    table = {p.tobytes(): f for p, f in zip(pixels, np.asarray(model.vision_tower(mx.array(pixels))))}
    order = []

    def encode(batch):
        order.extend(p.tobytes() for p in batch)
        return np.stack([table[p.tobytes()] for p in batch])

    expected = Conversation(model, tokenizer,
                            VisualTokens(encode_frames(model, images, sampling), None))
    expected.prefill_prefix()
    conv = Conversation(model, tokenizer, None, prefill_step=64)
    tower = StandInTower(encode, 8)
    tokens = conv.prefill_prefix_beside(
        lambda feed: encode_overlapped(model, frames_of(images), tower, sampling, feed)).embeddings
    slow_first = [p for i, p in enumerate(pixels) if i % sampling.slow_every == 0]
    slow_first += [p for i, p in enumerate(pixels) if i % sampling.slow_every != 0]
    assert order == [p.tobytes() for p in slow_first]
    assert_close(tokens, expected.visual.embeddings, 1e-5, "visual tokens")
    assert conv.offset == expected.offset
    n = conv.offset
    for a, b in zip(conv.cache, expected.cache):
        assert_close(a.keys[..., :n, :], b.keys[..., :n, :], 1e-4, "cached keys")
        assert_close(a.values[..., :n, :], b.values[..., :n, :], 1e-4, "cached values")
    answer = [r.token for r in conv.ask(QUESTION, max_tokens=MAX_TOKENS)]
    reference = [r.token for r in expected.ask(QUESTION, max_tokens=MAX_TOKENS)]
    assert answer == reference


# --- macOS: Core ML predictions -----------------------------------------------------------------


@on_macos
@pytest.mark.parametrize("units", ["ALL", "CPU_AND_NE", "CPU_AND_GPU"])
def test_coreml_features_match_mlx_tower(model_dir, units):
    """Within float16 tolerance, including a last batch the package pads (6 = 4 + 2)."""
    from sfllava_mlx.coreml_vision import CoreMLVisionTower

    config = ModelConfig.read(model_dir)
    tower = CoreMLVisionTower(model_dir, config, compute_units=units, dtype=mx.float32)
    pixels = mx.array(random_pixels(6, config.vision.image_size, seed=5))
    assert_close(tower(pixels), mlx_tower(model_dir)(pixels), 3e-2, f"Core ML ({units}) vs MLX")


@on_macos
def test_generate_answers_the_same_with_either_backend(work, converted, videos):
    from sfllava_convert.coreml import export
    from sfllava_mlx import load
    from sfllava_mlx.conversation import Conversation
    from sfllava_mlx.coreml_vision import CoreMLVisionTower
    from sfllava_mlx.encode import encode_video
    from sfllava_mlx.frames import read_frames

    d = work / "coreml-generate"
    shutil.copytree(converted["oryx-vit"], d, dirs_exist_ok=True)
    export(d, force=True)
    model, tokenizer = load(d)
    sampling = model.config.recipe()
    clip = read_frames(videos["main"], num_frames=sampling.num_frames)
    answers = {}
    for backend, vision in (("mlx", None), ("coreml", CoreMLVisionTower.for_model(model))):
        conv = Conversation(model, tokenizer, encode_video(model, clip, sampling, vision=vision))
        answers[backend] = [r.token for r in conv.ask(QUESTION, max_tokens=MAX_TOKENS)]
    assert answers["coreml"] == answers["mlx"]
