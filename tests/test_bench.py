"""`sfllava bench`: the work counts, the chip table, the JSON report, the sweep, and that
the stages account for the time to first token.

The counts are checked against numbers worked out by hand for small shapes, against the
bytes MLX itself allocates for the same model, and against the parameter counts Qwen
publishes for Qwen2.5 (independent references). The bench runs on a tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from sfllava_app import bench
from sfllava_app.bench import hardware
from sfllava_app.bench import random_weights as rw
from sfllava_app.cli import main as cli_main
from sfllava_mlx.config import (
    ModelConfig,
    PreprocessConfig,
    ProjectorConfig,
    PromptConfig,
    SamplingConfig,
    VisionConfig,
    family_recipes,
)
from sfllava_mlx.errors import UserError
from sfllava_mlx.model import SFLLaVA

# A small Qwen2: D=8, 2 layers, 2 heads of 4, 1 KV head, MLP 16, vocabulary 10.
SMALL = dict(model_type="qwen2", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, intermediate_size=16, vocab_size=10, rms_norm_eps=1e-6,
             tie_word_embeddings=True, max_position_embeddings=64)


# ---------------------------------------------------------------------------------------
# Work counts by hand


def test_llm_counts_by_hand():
    # per layer: q 8x8=64, k and v 4x8=32 each, o 8x8=64, MLP 3*8*16=384 -> 576; 2 layers
    assert hardware.llm_matmul_params(SMALL) == 1152
    # 3 new tokens after 5 cached: keys seen 6+7+8 = 21; 4 FLOP * 2 heads * 4 dims * 2 layers
    assert hardware.attention_flops(SMALL, 3, 5) == 21 * 4 * 2 * 4 * 2
    # prefill 3 tokens from empty: 2*1152*3 + attention (1+2+3=6 keys -> 6*64) + 2*8*10 logits
    assert hardware.prefill_flops(SMALL, 3) == 6912 + 384 + 160
    # KV per token: K and V, 2 layers, 1 KV head of 4 values, 2 bytes
    assert hardware.kv_bytes_per_token(SMALL, 2) == 32
    # decode at context 10: all weights once (tied: the embedding is the output layer)
    assert hardware.decode_bytes_per_token(SMALL, 2608, 32, 10) == 2608 + 320


def test_vision_counts_by_hand():
    # 8x8 image, patch 4: N=4 tokens; D=6, MLP 10, 2 blocks of which feature_layer=1 runs
    vc = VisionConfig(hidden_size=6, intermediate_size=10, num_hidden_layers=2,
                      num_attention_heads=2, image_size=8, patch_size=4, feature_layer=1)
    patch = 2 * 4 * 48 * 6  # 4 tokens, 3*4*4 inputs, 6 outputs
    block = (2 * 4 * 6 * 18  # fused qkv
             + 2 * 2 * 4 * 4 * 6  # QK^T and AV: N*N*D each
             + 2 * 4 * 6 * 6  # output projection
             + 2 * 2 * 4 * 6 * 10)  # fc1, fc2
    assert hardware.vision_flops_per_frame(vc) == patch + block
    pc = ProjectorConfig(input_size=6, hidden_size=5)
    assert hardware.projector_flops_per_frame(vc, pc) == 2 * 4 * (6 * 5 + 5 * 5)


def test_sfllava_tower_is_half_a_teraflop_per_frame():
    # NOTES.md: SO400M-class tower at 384 px, patch 16 (576 tokens): ~0.52 TFLOP per frame
    flops = hardware.vision_flops_per_frame(rw.model_config("1.5b").vision)
    assert 0.50e12 < flops < 0.53e12


@pytest.mark.parametrize("size,non_embedding", [("1.5b", 1.31e9), ("3b", 2.77e9), ("7b", 6.53e9)])
def test_non_embedding_parameters_match_qwen(size, non_embedding):
    # Qwen2.5 model cards: 1.31B / 2.77B / 6.53B non-embedding parameters (biases and norms
    # are under 0.1% of them)
    count = hardware.llm_matmul_params(rw.model_config(size).text_config)
    assert abs(count - non_embedding) / non_embedding < 0.005


def test_onevision_shapes_and_recipes():
    """LLaVA-OneVision at llava-onevision-qwen2-*-ov shapes: SigLIP so400m with 26 stored
    blocks at 384 px, patch 14 (grid 27 = the position table), and the recipes' token counts."""
    for size in ("ov-0.5b", "ov-7b"):
        c = rw.model_config(size)
        assert (c.family, c.layout, c.projector.image_newline) == ("llava-onevision", "llava-hf", True)
        v = c.vision
        assert (v.grid, v.num_patches, v.pos_grid, v.feature_layer, v.num_hidden_layers) == (
            27, 729, 27, 26, 26)
        assert (v.hidden_act, v.pos_interpolation) == ("gelu_pytorch_tanh", "bicubic")
        assert c.recipes == family_recipes("llava-onevision", "bilinear", "one_token")
        from sfllava_mlx.tokens import num_visual_tokens

        # native: 32 x 14 x 14 + 1; slowfast: 32 x 14 x 14 + 96 x 7 x 7 + 1 (design.md §2.1)
        assert num_visual_tokens(27, c.recipes["native"]) == 6273
        assert num_visual_tokens(27, c.recipes["slowfast"]) == 10977
    # NOTES.md: the so400m-class tower at 729 tokens costs ~0.67 TFLOP a frame with 27 blocks;
    # OneVision runs 26
    flops = hardware.vision_flops_per_frame(rw.model_config("ov-0.5b").vision)
    assert flops == pytest.approx(0.67e12 * 26 / 27, rel=0.02)
    assert rw.display_name("ov-0.5b") == "LLaVA-OneVision 0.5b"


@pytest.mark.parametrize("size,total,non_embedding", [("ov-0.5b", 0.49e9, 0.36e9),
                                                      ("ov-7b", 7.61e9, 6.53e9)])
def test_onevision_llm_matches_qwen(size, total, non_embedding):
    # Qwen2.5 model cards (the same shapes as Qwen2-0.5B / Qwen2-7B): 0.49B / 7.61B
    # parameters, 0.36B / 6.53B of them non-embedding (two significant figures)
    config = rw.model_config(size)
    count = hardware.llm_matmul_params(config.text_config)
    assert count == pytest.approx(non_embedding, rel=0.01)
    llm = SFLLaVA(config).language_model  # lazy: nothing is allocated
    assert sum(v.size for _, v in tree_flatten(llm.parameters())) == pytest.approx(total, rel=0.01)


def test_pooling_flops_by_hand():
    vc = VisionConfig(image_size=40, patch_size=8)  # grid 5
    # bilinear, stride 2 -> 3x3: (3*5*5 + 3*3*5) multiply-adds per channel, 2 FLOP each
    s = SamplingConfig(num_frames=2, slow_every=1, pool_mode="bilinear")
    assert hardware.pooling_flops(vc, 4, s) == 2 * 2 * (75 + 45) * 4
    # average, strides 2 / 4 on 1 slow + 3 fast frames: every value added once
    s = SamplingConfig(num_frames=4, pool_mode="average")
    assert hardware.pooling_flops(vc, 4, s) == 4 * 25 * 4


def test_kv_bytes_match_notes():
    # NOTES.md: Qwen2.5-1.5B holds ~28 KB of KV per token of context in 16-bit
    assert hardware.kv_bytes_per_token(rw.model_config("1.5b").text_config, 2) == 28 * 1024


# ---------------------------------------------------------------------------------------
# The chip table and the peak


def test_chip_lookup():
    m2pro = hardware.lookup_chip("Apple M2 Pro")
    assert (m2pro.bandwidth_gbs, m2pro.fp16_tflops) == (200, 6.8)
    # M3 Max: the 30-core GPU has 300 GB/s, the 40-core 400 GB/s
    assert hardware.lookup_chip("Apple M3 Max", 30).bandwidth_gbs == 300
    assert hardware.lookup_chip("Apple M3 Max", 40).bandwidth_gbs == 400
    # a 14-core M1 Pro: TFLOPS scaled from the 16-core figure, bandwidth unchanged
    small = hardware.lookup_chip("Apple M1 Pro", 14)
    assert small.bandwidth_gbs == 200 and small.fp16_tflops == pytest.approx(5.3 * 14 / 16, abs=0.05)
    assert hardware.lookup_chip("Intel(R) Xeon(R)") is None
    assert hardware.gpu_core_count("Chipset Model: Apple M4 Max\n  Total Number of Cores: 40\n") == 40


def test_peak_user_figures_win():
    peak = hardware.resolve_peak(tflops=10.0, bandwidth_gbs=400.0)
    assert (peak.tflops, peak.bandwidth_gbs) == (10.0, 400.0)
    assert "user" in peak.source
    assert hardware.share(2e12, 0.5, 10e12) == pytest.approx(0.4)
    assert hardware.share(1.0, 0.0, 10e12) is None and hardware.share(1.0, 1.0, None) is None


# ---------------------------------------------------------------------------------------
# Random weights


def test_random_model_refuses_a_machine_too_small(monkeypatch):
    monkeypatch.setenv("SFLLAVA_MEMORY_LIMIT_GB", "2")
    with pytest.raises(UserError, match="needs about"):
        rw.random_model("7b", mx.float16)
    with pytest.raises(UserError, match="LLaVA-OneVision 7b .* needs about"):
        rw.random_model("ov-7b", mx.float16)
    assert cli_main(["bench", "--random-weights", "7b", "--dtype", "float16"]) == 2


# ---------------------------------------------------------------------------------------
# The bench on a tiny model


def tiny_config(num_frames=8) -> ModelConfig:
    text = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=640,
                max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6)
    return ModelConfig(
        layout="oryx-vit", text_config=text,
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8, pos_grid=4,
                            feature_layer=2),
        projector=ProjectorConfig(input_size=64, hidden_size=64),
        recipes={"native": SamplingConfig(num_frames=num_frames)},
        preprocess=PreprocessConfig(image_size=32),
        prompt=PromptConfig())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from sfllava_convert.tiny import write_tokenizer

    d = tmp_path_factory.mktemp("tiny-bench-model")
    write_tokenizer(d)
    config = tiny_config()
    model = rw.build_random(config)
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config.save(d)
    return d


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return bench.make_video(tmp_path_factory.mktemp("bench-video") / "clip.mp4", seconds=2,
                            width=96, height=64)


def run_json(capsys, *argv) -> dict:
    assert cli_main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_and_sweep(tiny_model, video, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    report = run_json(capsys, "--model", str(tiny_model), "--video", str(video),
                      "--frames", "4,8", "--q-bits", "none,8", "--runs", "2", "--warmup", "1",
                      "--max-tokens", "5", "--peak-tflops", "1", "--peak-bandwidth-gbs", "100")
    assert report["schema"] == "sfllava-bench/1"
    assert report["peak"] == {"tflops": 1.0, "bandwidth_gbs": 100.0,
                              "source": "user (--peak-tflops/--peak-bandwidth-gbs)"}
    rows = report["rows"]
    # one row per configuration: bits x frames
    assert [(r["config"]["q_bits"], r["config"]["num_frames"]) for r in rows] == [
        (None, 4), (None, 8), (8, 4), (8, 8)]
    for row in rows:
        assert set(row["stages"]) == set(bench.STAGE_KEYS)
        for key in bench.STAGE_KEYS:
            s = row["stages"][key]
            assert s is not None, (key, row["notes"])
            assert s["min"] <= s["median"] <= s["max"]
            assert len(row["runs"]) == 2
        assert set(row["memory_gb"]) >= {"peak", "weights", "kv_cache", "vision_working_set",
                                          "prefill_working_set"}
        assert row["memory_gb"]["kv_cache"] > 0 and row["memory_gb"]["weights"] > 0
        for key in ("vision_tower", "prefill", "decode", "followup_ttft"):
            assert row["share_of_peak"][key] > 0
    # visual tokens follow the frames: 4 frames = 1 slow (2x2) + 3 fast (1x1) = 7
    assert [r["config"]["visual_tokens"] for r in rows[:2]] == [7, 14]
    # an 8-bit LLM stores fewer weight bytes than float32
    assert rows[2]["memory_gb"]["weights"] < rows[0]["memory_gb"]["weights"]
    # the vision work is the same per frame whatever the bits
    assert rows[1]["work"]["vision_tower"]["flops"] == 2 * rows[0]["work"]["vision_tower"]["flops"]
    assert not (tmp_path / "xdg").exists()  # the reopen used a temporary cache


def test_stages_add_up_to_time_to_first_token(tiny_model, video, capsys):
    """frame decode + preprocessing + tower + projector/pooling + prefill = TTFT, up to
    the few milliseconds between them (building the conversation, tokenizing)."""
    report = run_json(capsys, "--model", str(tiny_model), "--video", str(video), "--frames", "8",
                      "--runs", "3", "--max-tokens", "2", "--no-reopen")
    row = report["rows"][0]
    for run in row["runs"]:
        parts = sum(run[k] for k in ("frame_decode", "preprocess", "vision_tower",
                                     "projector_pooling", "prefill"))
        assert all(run[k] >= 0 for k in ("frame_decode", "preprocess", "vision_tower",
                                         "projector_pooling", "prefill"))
        assert parts <= run["ttft"] + 1e-6
        assert run["ttft"] - parts < max(0.1 * run["ttft"], 0.02)
    assert row["stages"]["cached_reopen"] is None
    assert any("--no-reopen" in n for n in row["notes"])


def test_bad_arguments_are_user_errors(tiny_model, capsys):
    assert cli_main(["bench"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert cli_main(["bench", "--model", str(tiny_model), "--frames", "0"]) == 2
    assert cli_main(["bench", "--model", str(tiny_model), "--video", "/no/such.mp4"]) == 2
    assert cli_main(["bench", "--sizes", "13b"]) == 2


def test_vision_backend_sweep_axis(monkeypatch):
    """--vision-backend is a sweep axis; coreml names its compute units, and is refused
    off macOS before any model is built."""
    import argparse

    from sfllava_mlx.errors import UserError

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--random-weights", "1.5b", "--frames", "8,16",
                         "--vision-backend", "mlx,coreml:CPU_AND_NE"])
    monkeypatch.setattr("sys.platform", "darwin")
    rows = bench.configurations(args)
    assert [(c.num_frames, c.backend) for c in rows] == [
        (8, "mlx"), (8, "coreml:CPU_AND_NE"), (16, "mlx"), (16, "coreml:CPU_AND_NE")]
    opts = bench.backend_options(args, rows[1])
    assert (opts["vision_backend"], opts["compute_units"]) == ("coreml", "CPU_AND_NE")
    monkeypatch.setattr("sys.platform", "linux")
    with pytest.raises(UserError, match="needs macOS"):
        bench.configurations(args)
    with pytest.raises(UserError, match="--vision-backend"):
        bench.parse_backend("coreml:GPU")


def test_coreml_row_shows_the_overlap(tiny_model, video, capsys, monkeypatch):
    """A Core ML row runs the overlapped path; here a stand-in tower (the MLX tower behind
    Core ML's interface) takes Core ML's place, which predicts only on macOS."""
    import mlx.core as mx
    import numpy as np

    from sfllava_mlx.engine import Engine

    class StandIn:
        batch_size = 4

        def __init__(self, model):
            self.model = model

        def encode(self, pixels):
            return np.array(self.model.vision_tower(mx.array(pixels)))

    monkeypatch.setattr("sys.platform", "darwin")
    monkeypatch.setattr(Engine, "vision_backend",
                        lambda engine, opts: StandIn(engine.model) if opts.vision_backend == "coreml"
                        else None)
    report = run_json(capsys, "--model", str(tiny_model), "--video", str(video), "--frames", "8",
                      "--runs", "1", "--warmup", "0", "--max-tokens", "2", "--no-reopen",
                      "--vision-backend", "mlx,coreml:CPU_AND_NE")
    mlx_row, coreml_row = report["rows"]
    assert coreml_row["config"]["vision_backend"] == "coreml:CPU_AND_NE"
    assert mlx_row["stages"]["overlap"]["median"] == 0
    run = coreml_row["runs"][0]
    assert run["overlap"] >= 0 and run["vision_tower"] > 0 and run["prefill"] > 0
    assert run["frame_decode"] + run["vision_tower"] + run["prefill"] <= run["ttft"] + 1e-6
    assert coreml_row["config"]["visual_tokens"] == mlx_row["config"]["visual_tokens"]


# ---------------------------------------------------------------------------------------
# LLaVA-OneVision: the recipe axis


def test_recipe_sweep_axis():
    """--recipe is a sweep axis beside --q-bits and --frames; rows name family and recipe."""
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--random-weights", "ov-0.5b", "--recipe", "native,slowfast",
                         "--q-bits", "none,4"])
    rows = bench.configurations(args)
    assert [(c.q_bits, c.recipe) for c in rows] == [
        (None, "native"), (None, "slowfast"), (4, "native"), (4, "slowfast")]
    rows[1].dtype, rows[1].num_frames = "float32", 128
    assert rows[1].label().startswith("LLaVA-OneVision 0.5b (random weights), float32, "
                                      "unquantized, recipe slowfast, 128 frames")
    # the memory is planned for the longest recipe: slowfast's 10,977 tokens
    assert bench.configs.longest_video(rw.model_config("ov-0.5b"), rows) == 10977
    args = p.parse_args(["--random-weights", "ov-0.5b", "--recipe", "fast"])
    with pytest.raises(UserError, match="--recipe fast"):
        bench.configurations(args)


def tiny_onevision_config() -> ModelConfig:
    """A tiny llava-hf model: grid 5 (bilinear pooling to 3, or 2 for the fast stream),
    a learned newline, the family's two recipes."""
    config = tiny_config()
    recipes = family_recipes("llava-onevision", "bilinear", "one_token")
    config.vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=40, patch_size=8, pos_grid=5,
                                 feature_layer=2, hidden_act="gelu_pytorch_tanh",
                                 pos_interpolation="bicubic")
    config.preprocess = PreprocessConfig(image_size=40)
    config.projector = ProjectorConfig(input_size=64, hidden_size=64, image_newline=True)
    return ModelConfig(layout="llava-hf", text_config=config.text_config, vision=config.vision,
                       projector=config.projector, recipes=recipes,
                       preprocess=config.preprocess, prompt=config.prompt,
                       family="llava-onevision")


def test_onevision_bench_rows(tmp_path, video, capsys, monkeypatch):
    """A converted OneVision model benched over both recipes: each row names family and
    recipe, counts the recipe's tokens (newline included) and the work of its frames."""
    from sfllava_convert.tiny import write_tokenizer

    write_tokenizer(tmp_path)
    config = tiny_onevision_config()
    model = rw.build_random(config)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config.save(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    report = run_json(capsys, "--model", str(tmp_path), "--video", str(video), "--frames", "8",
                      "--recipe", "native,slowfast", "--runs", "1", "--warmup", "0",
                      "--max-tokens", "2", "--peak-tflops", "1", "--peak-bandwidth-gbs", "100")
    native, slowfast = report["rows"]
    assert [(r["config"]["family"], r["config"]["recipe"]) for r in (native, slowfast)] == [
        ("llava-onevision", "native"), ("llava-onevision", "slowfast")]
    assert "recipe slowfast" in slowfast["config"]["label"] and "llava-onevision" in slowfast["config"]["label"]
    # native: 8 frames x 3 x 3 + 1 newline; slowfast: 2 slow x 3 x 3 + 6 fast x 2 x 2 + 1
    assert native["config"]["visual_tokens"] == 73
    assert slowfast["config"]["visual_tokens"] == 18 + 24 + 1
    per_frame = hardware.vision_flops_per_frame(config.vision)
    for row in (native, slowfast):
        assert row["config"]["num_frames"] == 8
        assert row["work"]["vision_tower"]["flops"] == 8 * per_frame
        assert row["stages"]["cached_reopen"] is not None, row["notes"]
    pooled = {name: hardware.pooling_flops(config.vision, 64, config.recipe(name, 8))
              for name in ("native", "slowfast")}
    assert (native["work"]["projector_pooling"]["flops"]
            - slowfast["work"]["projector_pooling"]["flops"]) == pooled["native"] - pooled["slowfast"]
