"""`sfllava convert` on LLaVA-OneVision / LLaVA-Video checkpoints (issue #9, design.md §5.2 layouts
`llava-hf` and `llava-siglip` with a newline): every naming a real checkpoint of the family
has maps to the same MLX model, the refusals name their field, padded vocabulary rows are
kept, the converted config.json carries the family and both recipes (design.md §2.1), and a
4-bit conversion still answers.

Sources are tiny `LlavaOnevisionForConditionalGeneration` models (tests/onevision_reference.py)
written by transformers itself or renamed from its in-memory tensors. Expected converted
tensors are derived here from transformers' in-memory names, through the transforms of
docs/design.md (conv to O,H,W,I; q, k, v stacked), not through the converter's own map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the sources are transformers models")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the sources are written with transformers 5's save_pretrained names (design.md §5.2 "
                "llava-hf)", allow_module_level=True)

from tests.onevision_reference import (  # noqa: E402
    IMAGE_MEAN,
    LLM_VOCAB,
    ONEVISION_NATIVE,
    TINY_OV,
    TOKENIZER_VOCAB,
    VIDEO_MEAN,
    VIDEO_STD,
    build_model,
    frame_positions,
    llava_video_native,
    slowfast_recipe,
    state_dict,
    write_checkpoint,
)

VISION = "model.vision_tower."
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps",
               "tie_word_embeddings")


def cli(args, capsys):
    """`sfllava convert ...` in-process through the real CLI entry: (status, stdout, stderr)."""
    from sfllava_app.cli import main

    capsys.readouterr()  # drop what came before (transformers' save_pretrained progress bar)
    rc = main(["convert"] + [str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def convert(src, dst, capsys, *flags) -> Path:
    rc, out, err = cli(["--hf-path", src, "--mlx-path", dst, "--dtype", "float32", *flags], capsys)
    assert rc == 0, err
    return Path(dst)


def converted_tensors(path: Path) -> dict:
    from sfllava_convert.tiny import read_tensors

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(read_tensors(f))
    return out


def tensor_names(src: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), "np") as f:
        return list(f.keys())


def load_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def expected_tensors(model, feature_layer: int) -> dict:
    """The MLX model directory's tensors (docs/design.md), from transformers' in-memory names."""
    src = {k: v.numpy() for k, v in state_dict(model).items()}
    out = {}
    for k, v in src.items():
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
        elif k.startswith("model.multi_modal_projector."):
            out["projector." + k[len("model.multi_modal_projector."):]] = v
        elif k == "model.image_newline":
            out["image_newline"] = v
    conv = src[VISION + "embeddings.patch_embedding.weight"]  # (O, I, H, W) -> MLX (O, H, W, I)
    out["vision_tower.patch_embed.weight"] = conv.transpose(0, 2, 3, 1)
    out["vision_tower.patch_embed.bias"] = src[VISION + "embeddings.patch_embedding.bias"]
    out["vision_tower.pos_embed"] = src[VISION + "embeddings.position_embedding.weight"]
    for i in range(feature_layer):  # blocks past the feature layer are not stored
        L, B = f"{VISION}encoder.layers.{i}.", f"vision_tower.blocks.{i}."
        for x in ("weight", "bias"):
            out[B + "attn.qkv." + x] = np.concatenate([src[L + f"self_attn.{p}_proj.{x}"] for p in "qkv"])
            out[B + "attn.proj." + x] = src[L + "self_attn.out_proj." + x]
            out[B + "norm1." + x] = src[L + "layer_norm1." + x]
            out[B + "norm2." + x] = src[L + "layer_norm2." + x]
            out[B + "mlp.fc1." + x] = src[L + "mlp.fc1." + x]
            out[B + "mlp.fc2." + x] = src[L + "mlp.fc2." + x]
    return out


def assert_tensors_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (
        f"{what}: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def untied():
    """Unsharpened, untied (lm_head of its own), feature layer -1 (the last block)."""
    return build_model(tied=False, feature_layer=-1, sharpen=False)


@pytest.fixture(scope="module")
def tied():
    return build_model(tied=True, feature_layer=-1, sharpen=False)


# ---------------------------------------------------------------------------------------
# Each naming maps


def write_in_memory_vision_model(model, dst: Path) -> Path:
    """In-memory names with the tower under model.vision_tower.vision_model.* (transformers 4.5x)."""
    from safetensors.torch import save_file

    write_checkpoint(model, dst, "in-memory")
    tensors = {(VISION + "vision_model." + k[len(VISION):] if k.startswith(VISION) else k): v
               for k, v in state_dict(model).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


NAMING_WRITERS = {
    "save_pretrained": lambda m, d: write_checkpoint(m, d, "save_pretrained"),
    "hub-2024": lambda m, d: write_checkpoint(m, d, "hub-2024"),
    "in-memory": lambda m, d: write_checkpoint(m, d, "in-memory"),
    "in-memory-vision_model": write_in_memory_vision_model,
    # LLaVA-NeXT's own files, full tower, feature = last block (mm_vision_select_layer -1)
    "llava-next": lambda m, d: write_checkpoint(m, d, "llava-next"),
}


@pytest.mark.parametrize("naming", NAMING_WRITERS)
def test_each_naming_maps_to_the_same_model(naming, untied, tmp_path, capsys):
    src = NAMING_WRITERS[naming](untied, tmp_path / "src")
    names = tensor_names(src)
    marker = {"save_pretrained": "vision_tower.embeddings.patch_embedding.weight",
              "hub-2024": "vision_tower.vision_model.embeddings.patch_embedding.weight",
              "in-memory": "model.vision_tower.embeddings.patch_embedding.weight",
              "in-memory-vision_model": "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
              "llava-next": "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"}
    assert marker[naming] in names  # the source really is in that naming
    rc, out, err = cli(["--hf-path", src, "--mlx-path", tmp_path / "mlx", "--dtype", "float32"], capsys)
    assert rc == 0, err
    assert "post_layernorm" in out  # dropped, and listed (design.md §5.2)
    dst = tmp_path / "mlx"
    assert_tensors_equal(converted_tensors(dst), expected_tensors(untied, TINY_OV["vision_layers"]), naming)
    cfg = load_config(dst)
    assert cfg["layout"] == ("llava-siglip" if naming == "llava-next" else "llava-hf")
    assert cfg["family"] == "llava-onevision"
    assert cfg["vision_config"]["feature_layer"] == 3
    assert cfg["vision_config"]["pos_interpolation"] == "bicubic"
    assert cfg["projector_config"]["image_newline"] is True
    text = cfg["text_config"]
    tc = untied.config.text_config
    assert {k: text[k] for k in TEXT_FIELDS} == {
        "hidden_size": tc.hidden_size, "num_hidden_layers": tc.num_hidden_layers,
        "intermediate_size": tc.intermediate_size, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "vocab_size": LLM_VOCAB,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    # the video processor's values win over the image processor's for videos
    assert cfg["preprocess"]["image_mean"] == VIDEO_MEAN != IMAGE_MEAN
    assert cfg["preprocess"]["image_std"] == VIDEO_STD
    assert cfg["preprocess"]["image_size"] == TINY_OV["image_size"]


@pytest.mark.parametrize("where", ["both", "text_config-only", "top-level-only"])
def test_tied_embeddings(where, tied, tmp_path, capsys):
    """Tied where transformers ties (top level or text_config): no lm_head in the file or
    in the converted model."""
    src = write_checkpoint(tied, tmp_path / "src", "save_pretrained")
    cfg = load_config(src)
    if where == "text_config-only":
        del cfg["tie_word_embeddings"]
    elif where == "top-level-only":
        del cfg["text_config"]["tie_word_embeddings"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert not any("lm_head" in k for k in tensor_names(src))
    dst = convert(src, tmp_path / "mlx", capsys)
    assert_tensors_equal(converted_tensors(dst), expected_tensors(tied, 3), "tied")
    assert load_config(dst)["text_config"]["tie_word_embeddings"] is True


def test_llava_next_file_one_block_short_of_its_tower(tmp_path, capsys):
    """LLaVA-NeXT deletes SigLIP's last block: the file holds 2 of the 3 named blocks and says
    -2, which resolves against the named tower to hidden state 2 = the last stored block."""
    model = build_model(tied=False, feature_layer=-2, sharpen=False)
    src = write_checkpoint(model, tmp_path / "src", "llava-next", drop_last_block=True)
    assert load_config(src)["mm_vision_select_layer"] == -2
    dst = convert(src, tmp_path / "mlx", capsys)
    assert_tensors_equal(converted_tensors(dst), expected_tensors(model, 2), "llava-next, 2 of 3 blocks")
    assert load_config(dst)["vision_config"]["feature_layer"] == 2
    # the same file saying -1 (the missing block's output) is refused, naming what it lacks
    src1 = write_checkpoint(model, tmp_path / "src-1", "llava-next", drop_last_block=True,
                            config_changes={"mm_vision_select_layer": -1})
    rc, out, err = cli(["--hf-path", src1, "--mlx-path", tmp_path / "mlx-1"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert "missing" in err.splitlines()[0] and "encoder.layers.2." in err, err
    assert not (tmp_path / "mlx-1").exists()


@pytest.mark.parametrize("layer,feature", [(-1, 3), (-2, 2), (1, 1)])
def test_llava_hf_feature_layer(layer, feature, untied, tmp_path, capsys):
    """vision_feature_layer indexes the tower's hidden states (0 = embeddings, k = block k);
    only the blocks up to it are stored."""
    src = write_checkpoint(untied, tmp_path / "src", "save_pretrained",
                           config_changes={"vision_feature_layer": layer})
    dst = convert(src, tmp_path / "mlx", capsys)
    assert load_config(dst)["vision_config"]["feature_layer"] == feature
    assert_tensors_equal(converted_tensors(dst), expected_tensors(untied, feature), f"layer {layer}")


def test_llava_hf_without_image_newline_is_refused(untied, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = write_checkpoint(untied, tmp_path / "src", "save_pretrained")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["image_newline"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    rc, out, err = cli(["--hf-path", src, "--mlx-path", tmp_path / "mlx"], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and "image_newline" in err.splitlines()[0], err


# ---------------------------------------------------------------------------------------
# Refusals: exit 2, one line naming the field


REFUSALS = {
    "select-strategy-default": ("save_pretrained", {"vision_feature_select_strategy": "default"},
                                "vision_feature_select_strategy"),
    "feature-layer-list": ("save_pretrained", {"vision_feature_layer": [-2, -1]}, "vision_feature_layer"),
    "cls_patch": ("llava-next", {"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
    # not in the list, refused all the same: no recipe computes them
    "max-pooling": ("llava-next", {"mm_newline_position": "grid", "mm_spatial_pool_mode": "max"},
                    "mm_spatial_pool_mode"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_by_name(case, untied, tmp_path, capsys):
    naming, change, field = REFUSALS[case]
    src = write_checkpoint(untied, tmp_path / "src", naming, config_changes=change)
    change = {field: change[field]}
    dst = tmp_path / "mlx"
    rc, out, err = cli(["--hf-path", src, "--mlx-path", dst], capsys)
    assert rc == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"not one line:\n{err}"
    assert lines[0].startswith("error: ") and field in lines[0], lines[0]
    value = str(list(change.values())[0]).strip("[]").split(",")[0]
    assert value in lines[0], lines[0]  # and the offending value
    assert not dst.exists()


# ---------------------------------------------------------------------------------------
# Vocabulary padding, recipes


def test_padded_vocab_rows_are_kept(untied, tmp_path, capsys):
    """The LLM has 700 rows, the tokenizer 640 ids: the 60 padding rows stay (embedding and
    lm_head), as they are."""
    src = write_checkpoint(untied, tmp_path / "src", "save_pretrained")
    dst = convert(src, tmp_path / "mlx", capsys)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(src))) == TOKENIZER_VOCAB < LLM_VOCAB
    conv = converted_tensors(dst)
    want = state_dict(untied)
    for mlx_name, name in (("language_model.model.embed_tokens.weight",
                            "model.language_model.embed_tokens.weight"),
                           ("language_model.lm_head.weight", "lm_head.weight")):
        assert conv[mlx_name].shape == (LLM_VOCAB, TINY_OV["hidden"])
        pad = want[name].numpy()[TOKENIZER_VOCAB:]
        assert np.abs(pad).max() > 0
        np.testing.assert_array_equal(conv[mlx_name][TOKENIZER_VOCAB:], pad)
    assert load_config(dst)["text_config"]["vocab_size"] == LLM_VOCAB


RECIPE_CASES = {
    # source naming, LLaVA-NeXT config fields, family, native recipe
    "llava-hf": ("save_pretrained", {}, "llava-onevision", ONEVISION_NATIVE),
    "llava-next-one_token": ("llava-next", {"mm_newline_position": "one_token"}, "llava-onevision",
                             ONEVISION_NATIVE),
    "llava-next-no-position": ("llava-next", {"mm_newline_position": None}, "llava-onevision",
                               ONEVISION_NATIVE),
    "llava-video-grid": ("llava-next", {"mm_newline_position": "grid"}, "llava-video",
                         llava_video_native("average", "grid")),
    "llava-video-grid-bilinear": ("llava-next", {"mm_newline_position": "grid",
                                                 "mm_spatial_pool_mode": "bilinear"},
                                  "llava-video", llava_video_native("bilinear", "grid")),
    "llava-video-frame": ("llava-next", {"mm_newline_position": "frame", "mm_spatial_pool_mode": "average"},
                          "llava-video", llava_video_native("average", "frame")),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_converted_config_carries_family_and_both_recipes(case, tied, tmp_path, capsys):
    naming, fields, family, native = RECIPE_CASES[case]
    src = write_checkpoint(tied, tmp_path / "src", naming, llava_next=fields)
    if fields.get("mm_newline_position", "") is None:
        cfg = load_config(src)
        del cfg["mm_newline_position"]
        (src / "config.json").write_text(json.dumps(cfg))
    cfg = load_config(convert(src, tmp_path / "mlx", capsys))
    assert cfg["family"] == family
    assert set(cfg["recipes"]) == {"native", "slowfast"}
    assert cfg["recipes"]["native"] == native
    assert cfg["recipes"]["slowfast"] == slowfast_recipe(native)
    assert cfg["sampling"] == native


# ---------------------------------------------------------------------------------------
# Quantized


def spliced_logits(model, tokenizer, video, num_frames: int) -> np.ndarray:
    """The runtime's own pipeline on the native recipe: frames, visual tokens, splice, logits."""
    import mlx.core as mx

    from sfllava_mlx.encode import encode_video
    from sfllava_mlx.frames import read_frames
    from tests.pieces import first_turn_tokens

    s = model.config.recipe("native", num_frames)
    clip = read_frames(video, num_frames=s.num_frames, slow_every=s.slow_every,
                       positions=s.frame_positions)
    visual = encode_video(model, clip, s)
    pieces = first_turn_tokens(tokenizer, model.config.prompt.system_prompt, "What happens in this video?")
    embeds = mx.concatenate([model.embed_tokens(pieces.prefix), visual.embeddings.astype(mx.float32),
                             model.embed_tokens(pieces.suffix)])
    logits = model.language_model(mx.zeros((1, embeds.shape[0]), dtype=mx.int32),
                                  input_embeddings=embeds[None])[0]
    return np.array(logits.astype(mx.float32)), visual


# max |logit(4-bit) - logit(float32)| over the spliced prompt of 8 frames (unsharpened fixture,
# as tests/test_quantized.py explains), max |float32 logit| 1.69.
# Measured (CPU, MLX 0.32, group size 64): 0.364. Bound: the measurement plus ~50%.
Q4_LOGIT_BOUND = 0.55


def test_4bit_llava_hf_converts_and_answers(untied, videos, tmp_path, capsys):
    import mlx.nn as nn

    from sfllava_mlx import load
    from sfllava_mlx.conversation import Conversation

    src = write_checkpoint(untied, tmp_path / "src", "save_pretrained")
    f32 = convert(src, tmp_path / "mlx", capsys)
    q4 = convert(src, tmp_path / "mlx-q4", capsys, "-q", "--q-bits", 4)
    assert load_config(q4)["quantization"]["bits"] == 4
    model, tokenizer = load(q4)
    quantized = [m for _, m in model.language_model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert quantized and all(m.bits == 4 for m in quantized)
    assert model.newline is not None and model.config.family == "llava-onevision"

    logits, visual = spliced_logits(model, tokenizer, videos["main"], 8)
    assert visual.embeddings.shape[0] == 8 * 16 + 1
    want, _ = spliced_logits(load(f32)[0], tokenizer, videos["main"], 8)
    diff = float(np.abs(logits - want).max())
    print(f"4-bit llava-hf: max |logit - float32 logit| = {diff:.3g} (max |logit| {np.abs(want).max():.3g})")
    assert 0 < diff <= Q4_LOGIT_BOUND

    conv = Conversation(model, tokenizer, visual)
    for _ in conv.ask("What happens in this video?", max_tokens=8):
        pass
    turn = conv.last_turn
    assert turn.tokens and len(turn.tokens) == len(turn.logprobs)
    assert all(np.isfinite(lp) and lp <= 0 for lp in turn.logprobs)


def test_frame_positions_rule():
    """The two position rules of design.md §1.1 / §2.1 as the tests compute them."""
    assert frame_positions(160, 32, "linspace")[:4] == [0, 5, 10, 15]
    assert frame_positions(160, 32, "linspace")[-1] == 159
    assert frame_positions(160, 32, "midpoint")[:3] == [2, 7, 12]
    assert frame_positions(10, 1, "linspace") == [0]
    assert frame_positions(3, 8, "midpoint") == [0, 0, 0, 1, 1, 2, 2, 2]
