"""`sfllava convert` (design.md §5.2, §3): both layouts, every documented transform, every refusal.

Converted weights are checked against the source tensors with numpy, through the
transforms written out here (conv transpose, q/k/v stacking, position-table reshape),
not through the converter's own map. Refusals run the real command line: exit status 2,
one clear first line, no traceback, nothing left at the destination.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sfllava_convert.tiny import (
    LLM,
    Extras,
    Files,
    Tower,
    read_source_tensors,
    read_tensors,
    write_source_checkpoint,
)

TOWER = "model.vision_tower.vision_tower."
SIG = TOWER + "vision_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def cli(args, capsys):
    """`sfllava convert ...` in-process through the real CLI entry: (status, stdout, stderr)."""
    from sfllava_app.cli import main

    rc = main(["convert"] + [str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def converted_tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(read_tensors(f))
    return out


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def assert_refused(tmp_path, capsys, src, dst, first_line_has, extra=(), details_have=()):
    rc, out, err = cli(["--hf-path", src, "--mlx-path", dst, *extra], capsys)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and first_line_has in lines[0], err
    assert "Traceback" not in err
    for d in details_have:
        assert d in err, err
    assert not Path(dst).exists()
    assert not [p for p in Path(dst).parent.iterdir() if p.name.startswith("." + Path(dst).name)]
    return err


def llm_expected(src: dict, out: dict, tied: bool) -> None:
    """Every LLM tensor is copied under `language_model.`; lm_head only when untied."""
    llm = [k for k in src if k.startswith("model.") and not k.startswith(("model.mm_projector",
                                                                          "model.vision_tower"))]
    for k in llm:
        np.testing.assert_array_equal(out["language_model." + k], src[k])
    assert ("language_model.lm_head.weight" in out) == (not tied)
    if not tied:
        np.testing.assert_array_equal(out["language_model.lm_head.weight"], src["lm_head.weight"])
    np.testing.assert_array_equal(out["projector.linear_1.weight"], src["model.mm_projector.0.weight"])
    np.testing.assert_array_equal(out["projector.linear_1.bias"], src["model.mm_projector.0.bias"])
    np.testing.assert_array_equal(out["projector.linear_2.weight"], src["model.mm_projector.2.weight"])
    np.testing.assert_array_equal(out["projector.linear_2.bias"], src["model.mm_projector.2.bias"])


# ---------------------------------------------------------------------------------------
# Successful conversions


def test_oryx_vit_weights_follow_the_documented_transforms(tmp_path, capsys):
    src_dir = write_source_checkpoint(tmp_path / "src", "oryx-vit", llm=LLM(tied=False),
                                      tower=Tower(final_norm=True, pos_grid=6), seed=3)
    dst = tmp_path / "mlx"
    rc, out, err = cli(["--hf-path", src_dir, "--mlx-path", dst, "--dtype", "float32"], capsys)
    assert rc == 0, err
    assert "oryx-vit" in out and "norm.*" in out  # the summary lists the dropped final norm

    src, conv = read_source_tensors(src_dir), converted_tensors(dst)
    llm_expected(src, conv, tied=False)
    np.testing.assert_array_equal(conv["vision_tower.patch_embed.weight"],
                                  src[TOWER + "patch_embed.proj.weight"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(conv["vision_tower.patch_embed.bias"], src[TOWER + "patch_embed.proj.bias"])
    np.testing.assert_array_equal(conv["vision_tower.pos_embed"], src[TOWER + "pos_embed"][0])
    assert conv["vision_tower.pos_embed"].shape == (36, 32)
    for i in range(3):  # feature = last block: all three stored
        for leaf in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            np.testing.assert_array_equal(conv[f"vision_tower.blocks.{i}.{leaf}"],
                                          src[f"{TOWER}blocks.{i}.{leaf}"])
    assert not any(k.startswith("vision_tower.norm") for k in conv)
    n_src = len(src) - 2  # all but the final norm ...
    assert len(conv) == n_src  # ... and nothing else

    cfg = load_config(dst)
    assert cfg["model_type"] == "sfllava" and cfg["layout"] == "oryx-vit"
    v = cfg["vision_config"]
    assert (v["feature_layer"], v["pos_grid"], v["pos_interpolation"], v["hidden_act"]) == (3, 6, "bilinear", "gelu")
    assert (v["image_size"], v["patch_size"], v["num_attention_heads"]) == (32, 8, 2)
    assert cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["text_config"]["rope_theta"] == 1e6
    assert cfg["preprocess"]["image_size"] == 32 and cfg["dtype"] == "float32"
    for f in TOKENIZER_FILES + ("preprocessor_config.json",):
        assert (dst / f).read_bytes() == (src_dir / f).read_bytes()


def test_llava_siglip_fuses_qkv_and_drops_what_the_feature_layer_skips(tmp_path, capsys):
    pos_ids = SIG + "embeddings.position_ids"
    src_dir = write_source_checkpoint(tmp_path / "src", "llava-siglip", tower=Tower(siglip_head=True),
                                      extras=Extras(tensors={pos_ids: (1, 16)}), seed=4)
    dst = tmp_path / "mlx"
    rc, out, err = cli(["--hf-path", src_dir, "--mlx-path", dst], capsys)
    assert rc == 0, err
    for dropped in ("head.*", "post_layernorm.*", "position_ids", "encoder.layers.2.*"):
        assert dropped in out, out

    src, conv = read_source_tensors(src_dir), converted_tensors(dst)
    llm_expected(src, conv, tied=True)
    np.testing.assert_array_equal(conv["vision_tower.patch_embed.weight"],
                                  src[SIG + "embeddings.patch_embedding.weight"].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(conv["vision_tower.pos_embed"], src[SIG + "embeddings.position_embedding.weight"])
    # mm_vision_select_layer -2 of 3 layers: hidden state 2 = output of block 1 -> blocks 0, 1 only
    assert sorted({k.split(".")[2] for k in conv if k.startswith("vision_tower.blocks.")}) == ["0", "1"]
    for i in range(2):
        L = f"{SIG}encoder.layers.{i}."
        B = f"vision_tower.blocks.{i}."
        for x in ("weight", "bias"):
            np.testing.assert_array_equal(
                conv[B + "attn.qkv." + x],
                np.concatenate([src[L + f"self_attn.{p}_proj.{x}"] for p in "qkv"], axis=0))
            np.testing.assert_array_equal(conv[B + "attn.proj." + x], src[L + "self_attn.out_proj." + x])
            np.testing.assert_array_equal(conv[B + "norm1." + x], src[L + "layer_norm1." + x])
            np.testing.assert_array_equal(conv[B + "norm2." + x], src[L + "layer_norm2." + x])
            np.testing.assert_array_equal(conv[B + "mlp.fc1." + x], src[L + "mlp.fc1." + x])
            np.testing.assert_array_equal(conv[B + "mlp.fc2." + x], src[L + "mlp.fc2." + x])
    v = load_config(dst)["vision_config"]
    assert (v["feature_layer"], v["pos_interpolation"], v["hidden_act"]) == (2, "bicubic", "gelu_pytorch_tanh")


def test_sharded_untied_transformers5_config(tmp_path, capsys):
    src_dir = write_source_checkpoint(tmp_path / "src", "llava-siglip",
                                      llm=LLM(tied=False, rope_theta=5e5),
                                      files=Files(shards=3, rope_style="rope_parameters"), seed=5)
    assert len(list(src_dir.glob("model-*.safetensors"))) == 3
    dst = tmp_path / "mlx"
    rc, out, err = cli(["--hf-path", src_dir, "--mlx-path", dst], capsys)
    assert rc == 0, err
    llm_expected(read_source_tensors(src_dir), converted_tensors(dst), tied=False)
    text = load_config(dst)["text_config"]
    assert text["rope_theta"] == 5e5 and text["tie_word_embeddings"] is False


@pytest.mark.parametrize("layout,select,feature", [("oryx-vit", 1, 1), ("oryx-vit", -2, 2),
                                                   ("llava-siglip", -1, 3), ("llava-siglip", 2, 2)])
def test_explicit_select_layer_wins(tmp_path, capsys, layout, select, feature):
    src_dir = write_source_checkpoint(tmp_path / "src", layout, extras=Extras(select_layer=select))
    dst = tmp_path / "mlx"
    rc, _, err = cli(["--hf-path", src_dir, "--mlx-path", dst], capsys)
    assert rc == 0, err
    assert load_config(dst)["vision_config"]["feature_layer"] == feature
    blocks = {k.split(".")[2] for k in converted_tensors(dst) if k.startswith("vision_tower.blocks.")}
    assert blocks == {str(i) for i in range(feature)}


def test_blocks_past_the_feature_layer_may_be_absent(tmp_path, capsys):
    """LLaVA-OneVision-style towers drop SigLIP's last layer before saving: that is fine
    when the feature layer does not need it, and a missing-tensor error when it does."""
    last = [n for n in read_source_tensors(write_source_checkpoint(tmp_path / "names", "llava-siglip"))
            if n.startswith(SIG + "encoder.layers.2.")]
    src = write_source_checkpoint(tmp_path / "src", "llava-siglip",
                                  extras=Extras(drop_tensors=last))  # select -2
    rc, _, err = cli(["--hf-path", src, "--mlx-path", tmp_path / "mlx"], capsys)
    assert rc == 0, err
    assert load_config(tmp_path / "mlx")["vision_config"]["feature_layer"] == 2
    src = write_source_checkpoint(tmp_path / "src-1", "llava-siglip",
                                  extras=Extras(drop_tensors=last, select_layer=-1))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx-1", "16 missing tensors", details_have=last)


def test_layout_defaults_without_vision_config():
    """design.md §5.2 defaults: Oryx-ViT, and SigLIP so400m-patch14-384 when mm_vision_tower names it."""
    from sfllava_mlx.checkpoints.layouts import ORYX, SIGLIP, vision_config
    from sfllava_mlx.errors import CheckpointError

    oryx, raw = vision_config(ORYX, {}, {TOWER + "pos_embed": (1, 128 * 128, 1152)})
    assert (oryx.hidden_size, oryx.intermediate_size, oryx.num_hidden_layers, oryx.num_attention_heads,
            oryx.patch_size, oryx.image_size, oryx.pos_grid, oryx.hidden_act, oryx.layer_norm_eps,
            oryx.feature_layer, oryx.pos_interpolation, raw) == (
        1152, 4304, 27, 16, 16, 384, 128, "gelu", 1e-6, 27, "bilinear", -1)
    cfg = {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_select_layer": -2}
    sig, _ = vision_config(SIGLIP, cfg, {SIG + "embeddings.position_embedding.weight": (729, 1152)})
    assert (sig.hidden_size, sig.num_hidden_layers, sig.num_attention_heads, sig.intermediate_size,
            sig.patch_size, sig.pos_grid, sig.hidden_act, sig.feature_layer, sig.pos_interpolation) == (
        1152, 27, 16, 4304, 14, 27, "gelu_pytorch_tanh", 26, "bicubic")
    # a vision_config wins over the named tower's defaults
    cfg["vision_config"] = {"num_hidden_layers": 5, "image_size": 224}
    sig, _ = vision_config(SIGLIP, cfg, {})
    assert (sig.num_hidden_layers, sig.image_size, sig.hidden_size, sig.feature_layer) == (5, 224, 1152, 4)
    with pytest.raises(CheckpointError, match="vision_config"):
        vision_config(SIGLIP, {"mm_vision_tower": "some/unknown-tower"}, {})


def test_defaults_are_checked_against_the_tensors(tmp_path, capsys):
    """Without vision_config the Oryx defaults apply, and the tiny tensors do not fit them."""
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit", files=Files(vision_config=False),
                                  extras=Extras(config={"mm_hidden_size": 1152}))
    err = assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "wrong shape",
                         details_have=[TOWER + "blocks.0.mlp.fc1.weight: expected [4304, 1152], found [64, 32]"])
    assert "missing" in err  # blocks 3..26 of the 27 default ones


def test_bfloat16_source_and_dtype_choice(tmp_path, capsys):
    import mlx.core as mx

    src_dir = write_source_checkpoint(tmp_path / "src", "oryx-vit", files=Files(dtype="bfloat16"))
    rc, _, err = cli(["--hf-path", src_dir, "--mlx-path", tmp_path / "default"], capsys)
    assert rc == 0, err
    w = mx.load(str(tmp_path / "default" / "model.safetensors"))
    expect = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16  # design.md §3
    assert {a.dtype for a in w.values()} == {expect}
    rc, _, err = cli(["--hf-path", src_dir, "--mlx-path", tmp_path / "f16", "--dtype", "float16"], capsys)
    assert rc == 0, err
    w16 = mx.load(str(tmp_path / "f16" / "model.safetensors"))
    assert {a.dtype for a in w16.values()} == {mx.float16}
    src = read_source_tensors(src_dir)  # bf16 -> float16 is exact for these magnitudes
    np.testing.assert_allclose(np.array(w16["language_model.model.embed_tokens.weight"].astype(mx.float32)),
                               src["model.embed_tokens.weight"], rtol=1e-2, atol=1e-4)
    assert load_config(tmp_path / "f16")["source"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_llm_float_vision(tmp_path, capsys, bits):
    from sfllava_mlx import load

    src_dir = write_source_checkpoint(tmp_path / "src", "llava-siglip", llm=LLM(tied=False))
    dst = tmp_path / "mlx"
    rc, out, err = cli(["--hf-path", src_dir, "--mlx-path", dst, "-q", "--q-bits", bits,
                        "--q-group-size", 64], capsys)
    assert rc == 0, err
    q = load_config(dst)["quantization"]
    assert (q["bits"], q["group_size"]) == (bits, 64)
    conv = converted_tensors_raw(dst)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens",
                 "lm_head"):
        assert "language_model." + name + ".scales" in conv, name
        assert conv["language_model." + name + ".weight"].dtype == "U32"
    assert not any(k.endswith(".scales") for k in conv if not k.startswith("language_model."))
    assert conv["vision_tower.blocks.0.attn.qkv.weight"].dtype == "F32"
    assert conv["projector.linear_1.weight"].dtype == "F32"
    model, _ = load(dst)  # the runtime loads it
    src = read_source_tensors(src_dir)
    import mlx.core as mx

    w = model.language_model.model.layers[0].mlp.up_proj
    deq = mx.dequantize(w.weight, w.scales, w.biases, group_size=64, bits=bits)
    err_max = np.abs(np.array(deq) - src["model.layers.0.mlp.up_proj.weight"]).max()
    assert err_max < (0.05 if bits == 4 else 0.005)


class _Header:
    def __init__(self, dtype):
        self.dtype = dtype


def converted_tensors_raw(path: Path) -> dict:
    """name -> safetensors dtype code, from the headers."""
    from safetensors import safe_open

    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as fh:
            out.update({k: _Header(fh.get_slice(k).get_dtype()) for k in fh.keys()})
    return out


def test_force_replaces_an_existing_model(tmp_path, capsys):
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit")
    dst = tmp_path / "mlx"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    rc, _, err = cli(["--hf-path", src, "--mlx-path", dst], capsys)
    assert rc == 2 and "already exists" in err.splitlines()[0] and "--force" in err
    assert (dst / "keep.txt").read_text() == "mine"
    rc, _, err = cli(["--hf-path", src, "--mlx-path", dst, "--force"], capsys)
    assert rc == 0, err
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "src"]


def test_pickle_only_with_allow_pickle(tmp_path, capsys):
    pytest.importorskip("torch", reason="torch writes (and reads) the pickle")
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit",
                                  files=Files(pickle=True, dtype="bfloat16"))
    dst = tmp_path / "mlx"
    assert_refused(tmp_path, capsys, src, dst, "--allow-pickle")
    rc, _, err = cli(["--hf-path", src, "--mlx-path", dst, "--allow-pickle", "--dtype", "float32"], capsys)
    assert rc == 0, err
    ref = write_source_checkpoint(tmp_path / "ref", "oryx-vit", files=Files(dtype="bfloat16"))
    src_t, conv = read_source_tensors(ref), converted_tensors(dst)
    np.testing.assert_array_equal(conv["vision_tower.pos_embed"], src_t[TOWER + "pos_embed"][0])
    np.testing.assert_array_equal(conv["language_model.model.embed_tokens.weight"],
                                  src_t["model.embed_tokens.weight"])


def test_hub_download_asks_only_for_needed_files(tmp_path, capsys, monkeypatch):
    import huggingface_hub as hub

    src = write_source_checkpoint(tmp_path / "snapshot", "oryx-vit")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, list(allow_patterns)))
        return str(src)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    rc, _, err = cli(["--hf-path", "apple/some-sf-llava", "--mlx-path", tmp_path / "mlx"], capsys)
    assert rc == 0, err
    assert len(calls) == 1 and calls[0][0] == "apple/some-sf-llava"
    patterns = calls[0][1]
    for needed in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json"):
        assert needed in patterns
    assert not any(p.endswith((".bin", ".pth", ".pt", ".py")) or p == "*" for p in patterns)

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    assert_refused(tmp_path, capsys, "apple/other-model", tmp_path / "mlx2", "cannot download")


def test_coreml_flag_exports_after_converting(tmp_path, capsys, monkeypatch):
    import sfllava_convert.coreml as coreml

    exported = []
    monkeypatch.setattr(coreml, "export", lambda path, *a, **k: exported.append(Path(path)))
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit")
    rc, _, err = cli(["--hf-path", src, "--mlx-path", tmp_path / "mlx", "--coreml"], capsys)
    assert rc == 0, err
    assert exported == [tmp_path / "mlx"] and (tmp_path / "mlx" / "config.json").exists()


# ---------------------------------------------------------------------------------------
# Refusals: exit 2, one clear line, the report, nothing left behind


def test_missing_tensor(tmp_path, capsys):
    name = "model.layers.1.mlp.up_proj.weight"
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit", extras=Extras(drop_tensors=[name]))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "1 missing", details_have=["missing", name])


def test_wrong_shape(tmp_path, capsys):
    name = SIG + "encoder.layers.0.self_attn.k_proj.weight"
    src = write_source_checkpoint(tmp_path / "src", "llava-siglip",
                                  extras=Extras(tensors={name: (31, 32)}))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "wrong shape",
                   details_have=[f"{name}: expected [32, 32], found [31, 32]"])


def test_unknown_tensor(tmp_path, capsys):
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit",
                                  extras=Extras(tensors={"model.mm_adapter.weight": (8, 8)}))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "unexpected",
                   details_have=["model.mm_adapter.weight [8, 8]"])


def test_learned_separator_is_named_not_dropped(tmp_path, capsys):
    src = write_source_checkpoint(tmp_path / "src", "llava-siglip",
                                  extras=Extras(tensors={"model.frame_separator": (64,)}))
    err = assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "model.frame_separator")
    assert "separator" in err.splitlines()[0]


def test_unknown_layout(tmp_path, capsys):
    tower = [n for n in read_source_tensors(write_source_checkpoint(tmp_path / "names", "oryx-vit"))
             if n.startswith(TOWER)]
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit", extras=Extras(
        drop_tensors=tower, tensors={"model.vision_tower.encoder.stem.weight": (4, 4)}))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "layout",
                   details_have=["model.vision_tower.encoder"])
    no_tower = write_source_checkpoint(tmp_path / "no-tower", "oryx-vit",
                                       extras=Extras(drop_tensors=tower))
    assert_refused(tmp_path, capsys, no_tower, tmp_path / "mlx", "no vision tower weights")


def test_truncated_safetensors(tmp_path, capsys):
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit", files=Files(shards=2))
    shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "truncated")


def test_missing_checkpoint_and_tokenizer(tmp_path, capsys):
    assert_refused(tmp_path, capsys, tmp_path / "nowhere", tmp_path / "mlx", "not found")
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit")
    for f in TOKENIZER_FILES:
        (src / f).unlink()
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "no tokenizer")


def test_tokenizer_larger_than_the_embeddings(tmp_path, capsys):
    # config.json says 600 embeddings, the tokenizer has 640 tokens
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit",
                                  extras=Extras(config={"vocab_size": 600}))
    assert_refused(tmp_path, capsys, src, tmp_path / "mlx", "640 tokens")


@pytest.mark.slow
def test_refusal_through_the_console_command(tmp_path):
    """The installed `sfllava` command: status 2, the message first, no traceback."""
    from tests.conftest import sfllava

    name = "model.layers.0.self_attn.q_proj.bias"
    src = write_source_checkpoint(tmp_path / "src", "llava-siglip", extras=Extras(drop_tensors=[name]))
    r = sfllava(["convert", "--hf-path", src, "--mlx-path", tmp_path / "mlx"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("error: checkpoint does not match")
    assert name in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlx").exists()


# ---------------------------------------------------------------------------------------
# The tiny checkpoint itself carries Hugging Face's names (the other tests rely on it)


def test_tiny_checkpoint_loads_into_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = write_source_checkpoint(tmp_path / "src", "llava-siglip", llm=LLM(tied=False),
                                  tower=Tower(siglip_head=True))
    cfg = load_config(src)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in read_source_tensors(src).items()}
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{k: v for k, v in cfg.items() if k not in ("model_type", "vision_config")}))
    llm = {k: v for k, v in tensors.items() if not k.startswith(("model.mm_projector", TOWER))}
    qwen.load_state_dict(llm, strict=True)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg["vision_config"]))
    # transformers 5 keeps SigLIP's modules at the top (it maps `vision_model.` on load)
    siglip = getattr(siglip, "vision_model", siglip)
    siglip.load_state_dict({k[len(SIG):]: v for k, v in tensors.items() if k.startswith(SIG)}, strict=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    assert tok.eos_token == "<|im_end|>" and len(tok) <= cfg["vocab_size"]
    assert tok.decode(tok("What happens in this video?").input_ids) == "What happens in this video?"


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = write_source_checkpoint(tmp_path / "a", "oryx-vit", seed=7, files=Files(dtype="bfloat16"))
    b = write_source_checkpoint(tmp_path / "b", "oryx-vit", seed=7, files=Files(dtype="bfloat16"))
    c = write_source_checkpoint(tmp_path / "c", "oryx-vit", seed=8, files=Files(dtype="bfloat16"))
    for f in sorted(os.listdir(a)):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
