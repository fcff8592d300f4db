"""The two source layouts of SPEC §3: detection, configuration and the name/shape map.

The map runs from the MLX model's side: for every parameter of `SFLLaVA(config)` a
template gives the source tensor(s) it is made of and how (copy, conv transpose,
position-table reshape, q/k/v fusion). What that leaves over in the checkpoint is
either known to be unused (dropped, with a reason), a learned separator (an error:
SPEC §2.6 has no place for it) or unknown (an error).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from sfllava_mlx.config import (
    ONEVISION_PINPOINTS,
    ImageConfig,
    ModelConfig,
    PreprocessConfig,
    ProjectorConfig,
    PromptConfig,
    VisionConfig,
    family_recipes,
)
from sfllava_mlx.errors import CheckpointError

ORYX = "oryx-vit"
SIGLIP = "llava-siglip"
HF = "llava-hf"  # transformers' LlavaOnevisionForConditionalGeneration
LAYOUTS = (ORYX, SIGLIP, HF)

TOWER = "model.vision_tower.vision_tower."
SIGLIP_PREFIX = TOWER + "vision_model."
ORYX_PREFIX = TOWER
NEWLINE = "model.image_newline"

# llava-hf names -> the LLaVA names the rules below read (first matching prefix wins), so
# the three namings of SPEC §3 (2024 hub files, transformers 5's save_pretrained, the
# model.-prefixed in-memory names) share one table with llava-siglip.
HF_RENAMES = [
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.vision_model.", SIGLIP_PREFIX),
    ("model.vision_tower.", SIGLIP_PREFIX),
    ("vision_tower.vision_model.", SIGLIP_PREFIX),
    ("vision_tower.", SIGLIP_PREFIX),
    ("model.image_newline", NEWLINE),
    ("image_newline", NEWLINE),
]
HF_MARKERS = ("language_model.", "model.language_model.", "multi_modal_projector.",
              "model.multi_modal_projector.")

# Hugging Face SigLIP vision_config field names (SPEC §3).
HF_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size", "hidden_act", "layer_norm_eps")
SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=384, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
ORYX_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, image_size=384, patch_size=16,
                     hidden_act="gelu", layer_norm_eps=1e-6)
# transformers' SiglipVisionConfig defaults, the base a partial vision_config completes.
HF_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=224, patch_size=16,
                          hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
KNOWN_SIGLIP_TOWERS = {"siglip-so400m-patch14-384": SO400M_384}

# oryx: last block; LLaVA's usual -2 for SigLIP; transformers' LlavaOnevisionConfig default -1
DEFAULT_FEATURE_LAYER = {ORYX: -1, SIGLIP: -2, HF: -1}
POS_INTERPOLATION = {ORYX: "bilinear", SIGLIP: "bicubic", HF: "bicubic"}
GELU_NAMES = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_new": "gelu_pytorch_tanh",
              "gelu_fast": "gelu_pytorch_tanh", "quick_gelu": None}

# Learned separator / newline vectors: never dropped silently (SPEC §2.6).
SEPARATOR = re.compile(r"newline|frame_sep|separator|seperator|sep_token|image_(start|end)"
                       r"|video_(start|end)|frame_(start|end)")


# ----------------------------------------------------------------------------------------
# Layout detection


def detect_layout(names) -> str:
    names = list(names)
    if any(n.startswith(HF_MARKERS) for n in names):
        return HF
    if any(n.startswith(SIGLIP_PREFIX) for n in names):
        return SIGLIP
    if any(n.startswith(tuple(ORYX_PREFIX + k for k in ("patch_embed.", "blocks.", "pos_embed")))
           for n in names):
        return ORYX
    prefixes = sorted({".".join(n.split(".")[:3]) for n in names})
    if not any(n.startswith("model.vision_tower.") for n in names):
        raise CheckpointError(
            "the checkpoint holds no vision tower weights (model.vision_tower.*): "
            "a tower loaded separately from mm_vision_tower is not supported",
            details="tensor name prefixes found:\n  " + "\n  ".join(prefixes[:40]))
    raise CheckpointError(
        "cannot tell the checkpoint's layout: no vision tower under "
        f"{SIGLIP_PREFIX}* (llava-siglip) or {ORYX_PREFIX}{{patch_embed,pos_embed,blocks}}.* (oryx-vit)",
        details="tensor name prefixes found:\n  " + "\n  ".join(prefixes[:40]))


def canonical_names(layout: str, names) -> dict:
    """{name the rules read: name in the checkpoint}; only llava-hf names are renamed."""
    out: dict = {}
    for name in names:
        canon = name
        if layout == HF:
            for old, new in HF_RENAMES:
                if name == old or (old.endswith(".") and name.startswith(old)):
                    canon = new + name[len(old):]
                    break
        if canon in out:
            raise CheckpointError(f"the checkpoint holds {out[canon]} and {name}: two names for "
                                  "one tensor")
        out[canon] = name
    return out


# ----------------------------------------------------------------------------------------
# Configuration


def _vision_fields(layout: str, config: dict) -> dict:
    tower = str(config.get("mm_vision_tower") or "")
    vc = config.get("vision_config")
    if layout == ORYX:
        base = ORYX_DEFAULTS
    elif layout == HF:  # transformers fills a partial vision_config from SigLIP's defaults
        base = HF_SIGLIP_DEFAULTS
    else:
        base = next((v for k, v in KNOWN_SIGLIP_TOWERS.items() if k in tower), None)
        if base is None and not isinstance(vc, dict):
            raise CheckpointError(
                f"config.json has no vision_config and its mm_vision_tower ({tower or 'unset'}) "
                "is not a SigLIP model whose shape is known; add a vision_config "
                "(Hugging Face SigLIP field names) to config.json",
                details=f"known towers: {', '.join(KNOWN_SIGLIP_TOWERS)}")
        base = base or HF_SIGLIP_DEFAULTS
    fields_ = dict(base)
    if isinstance(vc, dict):
        fields_.update({k: vc[k] for k in HF_VISION_FIELDS if vc.get(k) is not None})
    return fields_


def resolve_feature_layer(layout: str, config: dict, num_layers: int) -> tuple[int, int]:
    """(raw, resolved): an explicit feature layer wins over the layout's default.

    Negative indices count from the blocks of the tower as named (num_layers), not as
    stored: LLaVA-NeXT's files hold one block fewer than so400m and say -2 (SPEC §3).
    """
    key = "vision_feature_layer" if layout == HF else "mm_vision_select_layer"
    raw = config.get(key)
    if isinstance(raw, (list, tuple)):
        raise CheckpointError(f"{key} {raw} is a list (features of several layers "
                              "concatenated): not supported, one layer only")
    raw = DEFAULT_FEATURE_LAYER[layout] if raw is None else int(raw)
    k = raw if raw >= 0 else num_layers + 1 + raw  # HF hidden_states: L + 1 entries
    if not 0 <= k <= num_layers:
        raise CheckpointError(
            f"{key} {raw} is outside the vision tower's {num_layers} layers")
    return raw, k


def pos_grid_of(layout: str, shapes: dict, fallback: int) -> int:
    name = (ORYX_PREFIX + "pos_embed" if layout == ORYX
            else SIGLIP_PREFIX + "embeddings.position_embedding.weight")
    if name not in shapes:
        return fallback  # reported as missing later
    n = shapes[name][-2] if len(shapes[name]) >= 2 else shapes[name][0]
    g0 = math.isqrt(n)
    if g0 * g0 != n:
        raise CheckpointError(f"{name} has {n} positions, not a square grid")
    return g0


def vision_config(layout: str, config: dict, shapes: dict) -> tuple[VisionConfig, int]:
    f = _vision_fields(layout, config)
    act = GELU_NAMES.get(f["hidden_act"])
    if act is None:
        raise CheckpointError(f"vision activation {f['hidden_act']!r} is not supported (gelu or tanh gelu)")
    if f["hidden_size"] % f["num_attention_heads"]:
        raise CheckpointError(
            f"vision hidden size {f['hidden_size']} is not divisible by {f['num_attention_heads']} heads")
    raw, k = resolve_feature_layer(layout, config, f["num_hidden_layers"])
    grid = f["image_size"] // f["patch_size"]
    vcfg = VisionConfig(
        hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_hidden_layers"], num_attention_heads=f["num_attention_heads"],
        image_size=f["image_size"], patch_size=f["patch_size"], hidden_act=act,
        layer_norm_eps=float(f["layer_norm_eps"]), pos_grid=pos_grid_of(layout, shapes, grid),
        pos_interpolation=POS_INTERPOLATION[layout], feature_layer=k)
    return vcfg, raw


def text_config(config: dict, names, layout: str = SIGLIP) -> dict:
    """mlx-lm qwen2 ModelArgs fields from a (transformers 4 or 5) Qwen2 config."""
    inner = config.get("text_config") or {}
    if layout == HF:  # the LLM's own config wins; tied where either level says so, as transformers
        c = {**config, **inner}
        if "tie_word_embeddings" in config or "tie_word_embeddings" in inner:
            c["tie_word_embeddings"] = bool(config.get("tie_word_embeddings")
                                            or inner.get("tie_word_embeddings"))
    else:
        c = {**inner, **config}  # flat LLaVA fields win
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                           "num_attention_heads", "vocab_size") if k not in c]
    if missing:
        raise CheckpointError(f"config.json lacks the Qwen2 field(s) {', '.join(missing)}")
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"LLM activation {c['hidden_act']!r} is not Qwen2's silu")
    if c.get("use_sliding_window"):
        raise CheckpointError("sliding-window attention (use_sliding_window) is not supported")
    rope = c.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))  # transformers' default
    rope_scaling = c.get("rope_scaling")
    if rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "tie_word_embeddings" in c:
        tied = bool(c["tie_word_embeddings"])
    else:
        tied = "lm_head.weight" not in set(names)
    return {
        "model_type": "qwen2",
        "hidden_size": c["hidden_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "intermediate_size": c["intermediate_size"],
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
        "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "vocab_size": c["vocab_size"],
        "max_position_embeddings": c.get("max_position_embeddings", 32768),
        "rope_theta": float(rope_theta),
        "rope_traditional": False,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tied,
    }


def preprocess_config(vcfg: VisionConfig, preprocessor: Optional[dict]) -> PreprocessConfig:
    p = preprocessor or {}

    def triple(v):
        return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]

    return PreprocessConfig(
        image_size=vcfg.image_size,
        image_mean=triple(p.get("image_mean", 0.5)),
        image_std=triple(p.get("image_std", 0.5)),
    )


def check_features(layout: str, config: dict) -> None:
    """Refuse, by name, the feature and projector choices the runtime does not compute."""
    if layout == HF:
        strategy = config.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            raise CheckpointError(
                f"vision_feature_select_strategy {strategy!r} is not supported: 'default' drops a "
                "CLS token that SigLIP does not have (only 'full')")
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"projector_hidden_act {act!r} is not supported (gelu)")
        if config.get("multimodal_projector_bias") is False:
            raise CheckpointError("multimodal_projector_bias false is not supported (mlp2x_gelu "
                                  "has biases)")
        return
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(
            f"projector type {config['mm_projector_type']!r} is not supported (mlp2x_gelu)")
    select = config.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise CheckpointError(
            f"mm_vision_select_feature {select!r} is not supported: SigLIP has no CLS token "
            "(only 'patch')")


def model_config(layout: str, config: dict, shapes: dict, preprocessor: Optional[dict],
                 image_preprocessor: Optional[dict] = None) -> ModelConfig:
    check_features(layout, config)
    vcfg, raw_layer = vision_config(layout, config, shapes)
    text = text_config(config, shapes, layout)
    mm_hidden = config.get("mm_hidden_size", vcfg.hidden_size)
    if mm_hidden != vcfg.hidden_size:
        raise CheckpointError(
            f"mm_hidden_size {mm_hidden} differs from the vision tower's width {vcfg.hidden_size}")
    has_newline = NEWLINE in shapes
    family, recipes = model_recipes(layout, config, has_newline)
    preprocess = preprocess_config(vcfg, preprocessor)
    return ModelConfig(
        layout=layout,
        text_config=text,
        vision=vcfg,
        projector=ProjectorConfig(input_size=vcfg.hidden_size, hidden_size=text["hidden_size"],
                                  image_newline=has_newline),
        sampling=recipes["native"],
        preprocess=preprocess,
        prompt=PromptConfig(),
        source={"layout": layout, "feature_layer": raw_layer},
        family=family,
        recipes=recipes,
        image=image_config(layout, config, family, vcfg, preprocess, image_preprocessor),
    )


# ----------------------------------------------------------------------------------------
# Pictures (SPEC §2.11): the `image` section of config.json

PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # Pillow's resample ids
ANYRES_MAX = re.compile(r"anyres_max_(\d+)")


def _pinpoints(value, tile: int) -> list:
    """[[h, w], ...] pixels from a list, or LLaVA-NeXT's "(1x1),...,(6x6)" range in tiles."""
    if isinstance(value, str):
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if not found:
            raise CheckpointError(f"image_grid_pinpoints {value!r} is neither a list nor "
                                  "a (AxB),...,(CxD) range")
        (h0, w0), (h1, w1) = map(int, found[0]), map(int, found[-1])
        return [[i * tile, j * tile] for i in range(h0, h1 + 1) for j in range(w0, w1 + 1)]
    try:
        return [[int(h), int(w)] for h, w in value]
    except (TypeError, ValueError):
        raise CheckpointError(f"image_grid_pinpoints {value!r} is not a list of [height, width]") from None


def image_config(layout: str, config: dict, family: str, vcfg: VisionConfig,
                 preprocess: PreprocessConfig, image_pre: Optional[dict]) -> ImageConfig:
    """SF-LLaVA-1.5: `single` (its image recipe is unpublished). LLaVA-OneVision and
    LLaVA-Video: the any-resolution recipe their config names (`vision_aspect_ratio` of
    transformers' config, default anyres_max_9; `image_aspect_ratio` of LLaVA-NeXT's), with
    the image processor's grid, filter and normalization, as transformers computes it."""
    pre = image_pre or {}

    def triple(v):
        return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]

    # the image processor's normalization (preprocessor_config.json), not the video's
    mean = triple(pre.get("image_mean", preprocess.image_mean))
    std = triple(pre.get("image_std", preprocess.image_std))
    if family == "sf-llava-1.5":
        return ImageConfig("single", image_mean=list(preprocess.image_mean),
                           image_std=list(preprocess.image_std))
    aspect = (config.get("vision_aspect_ratio") or "anyres_max_9" if layout == HF
              else config.get("image_aspect_ratio") or "")
    m = ANYRES_MAX.fullmatch(str(aspect))
    if not m:  # e.g. "pad" or plain "anyres": not computed; the whole grid as SF-LLaVA does
        return ImageConfig("single", image_mean=mean, image_std=std)
    tile = vcfg.image_size
    raw = config.get("image_grid_pinpoints") or pre.get("image_grid_pinpoints")
    pinpoints = _pinpoints(raw, tile) if raw else [list(p) for p in ONEVISION_PINPOINTS]
    # A grid that does not tile the tower's frames cannot be computed as transformers does;
    # pictures then take the whole-grid path, and the video path (what most use) converts.
    bad = [p for p in pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    size = pre.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    if bad or (side and int(side) != tile):
        return ImageConfig("single", image_mean=mean, image_std=std)
    resample = PIL_FILTERS.get(pre.get("resample", 3))
    if resample is None:
        raise CheckpointError(f"the image processor's resample {pre.get('resample')!r} is not "
                              f"supported ({', '.join(f'{k} {v}' for k, v in PIL_FILTERS.items())})")
    return ImageConfig(f"anyres_max_{m.group(1)}", grid_pinpoints=pinpoints, resample=resample,
                       image_mean=mean, image_std=std)


# ----------------------------------------------------------------------------------------
# Recipes (SPEC §2.9): what each family's frames become, written into config.json

NEWLINE_POSITIONS = {"one_token": "one_token", "grid": "grid", "frame": "frame", "no_token": "none"}
POOL_MODES = ("average", "bilinear")


def model_recipes(layout: str, config: dict, has_newline: bool) -> tuple[str, dict]:
    """(family, {"native", "slowfast"}) from the checkpoint's LLaVA-NeXT fields."""
    if not has_newline and layout != HF:
        return "sf-llava-1.5", family_recipes("sf-llava-1.5")
    if not has_newline:
        raise CheckpointError("the checkpoint has no image_newline, which LLaVA-OneVision places "
                              "after the video")
    position = "one_token" if layout == HF else config.get("mm_newline_position") or "one_token"
    if position not in NEWLINE_POSITIONS:
        raise CheckpointError(f"mm_newline_position {position!r} is not supported "
                              f"({', '.join(NEWLINE_POSITIONS)})")
    stride = int(config.get("mm_spatial_pool_stride") or 2)
    if position == "one_token":  # LLaVA-OneVision, exactly as transformers runs it
        family, pool = "llava-onevision", "bilinear"
    else:  # LLaVA-Video
        family = "llava-video"
        pool = config.get("mm_spatial_pool_mode") or "average"
        if pool not in POOL_MODES:
            raise CheckpointError(f"mm_spatial_pool_mode {pool!r} is not supported "
                                  f"({', '.join(POOL_MODES)})")
    return family, family_recipes(family, pool, NEWLINE_POSITIONS[position], stride)


# ----------------------------------------------------------------------------------------
# The name and shape map

# (MLX name pattern, source name templates, transform). {i}: block index, {x}: weight|bias,
# {rest}: any LLM suffix. Source templates are relative to the layout's tower prefix,
# except for the shared rules.
SHARED_RULES = [
    (r"language_model\.model\.(?P<rest>.+)", ["model.{rest}"], "copy"),
    (r"language_model\.lm_head\.weight", ["lm_head.weight"], "copy"),
    (r"projector\.linear_1\.(?P<x>weight|bias)", ["model.mm_projector.0.{x}"], "copy"),
    (r"projector\.linear_2\.(?P<x>weight|bias)", ["model.mm_projector.2.{x}"], "copy"),
    (r"image_newline", [NEWLINE], "copy"),
]
TOWER_RULES = {
    SIGLIP: [
        (r"vision_tower\.patch_embed\.weight", ["embeddings.patch_embedding.weight"], "conv"),
        (r"vision_tower\.patch_embed\.bias", ["embeddings.patch_embedding.bias"], "copy"),
        (r"vision_tower\.pos_embed", ["embeddings.position_embedding.weight"], "copy"),
        (r"vision_tower\.blocks\.(?P<i>\d+)\.norm1\.(?P<x>weight|bias)",
         ["encoder.layers.{i}.layer_norm1.{x}"], "copy"),
        (r"vision_tower\.blocks\.(?P<i>\d+)\.norm2\.(?P<x>weight|bias)",
         ["encoder.layers.{i}.layer_norm2.{x}"], "copy"),
        (r"vision_tower\.blocks\.(?P<i>\d+)\.attn\.qkv\.(?P<x>weight|bias)",
         ["encoder.layers.{i}.self_attn.q_proj.{x}", "encoder.layers.{i}.self_attn.k_proj.{x}",
          "encoder.layers.{i}.self_attn.v_proj.{x}"], "fuse"),
        (r"vision_tower\.blocks\.(?P<i>\d+)\.attn\.proj\.(?P<x>weight|bias)",
         ["encoder.layers.{i}.self_attn.out_proj.{x}"], "copy"),
        (r"vision_tower\.blocks\.(?P<i>\d+)\.mlp\.(?P<fc>fc1|fc2)\.(?P<x>weight|bias)",
         ["encoder.layers.{i}.mlp.{fc}.{x}"], "copy"),
    ],
    ORYX: [
        (r"vision_tower\.patch_embed\.weight", ["patch_embed.proj.weight"], "conv"),
        (r"vision_tower\.patch_embed\.bias", ["patch_embed.proj.bias"], "copy"),
        (r"vision_tower\.pos_embed", ["pos_embed"], "pos"),
        (r"vision_tower\.blocks\.(?P<rest>\d+\..+)", ["blocks.{rest}"], "copy"),
    ],
}
TOWER_RULES[HF] = TOWER_RULES[SIGLIP]  # llava-hf names are renamed to LLaVA's first
TOWER_PREFIX = {SIGLIP: SIGLIP_PREFIX, ORYX: ORYX_PREFIX, HF: SIGLIP_PREFIX}

# Source tensors known to be unused at inference, by layout: (pattern, reason).
UNUSED = {
    SIGLIP: [
        (r"head\..+", "SigLIP's pooling head (the feature is the patch grid)"),
        (r"post_layernorm\.(weight|bias)", "post-LayerNorm (the feature layer skips it)"),
        (r"embeddings\.position_ids", "position ids buffer"),
    ],
    ORYX: [
        (r"(norm|fc_norm)\.(weight|bias)", "final LayerNorm (the feature layer skips it)"),
        (r"(attn_pool|head)\..+", "pooling head (the feature is the patch grid)"),
    ],
}
UNUSED[HF] = UNUSED[SIGLIP]
SHARED_UNUSED = [
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "rotary frequencies (recomputed)"),
]
BLOCK_INDEX = {SIGLIP: re.compile(r"encoder\.layers\.(\d+)\."), ORYX: re.compile(r"blocks\.(\d+)\.")}
BLOCK_INDEX[HF] = BLOCK_INDEX[SIGLIP]
LLM_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Rule:
    target: str
    sources: list
    kind: str  # copy | conv | pos | fuse


@dataclass
class Plan:
    rules: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)  # source name -> reason
    missing: list = field(default_factory=list)  # source names
    misshaped: list = field(default_factory=list)  # (source name, expected, actual)
    unexpected: dict = field(default_factory=dict)  # source name -> note
    separators: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.misshaped or self.unexpected or self.separators)


def expected_source_shapes(kind: str, shape: tuple, n: int) -> list:
    if kind == "conv":  # MLX (O, H, W, I) <- torch (O, I, H, W)
        return [(shape[0], shape[3], shape[1], shape[2])]
    if kind == "pos":  # (G0*G0, D) <- (1, G0*G0, D)
        return [(1,) + tuple(shape)]
    if kind == "fuse":  # (3D, ...) <- three (D, ...)
        return [(shape[0] // n,) + tuple(shape[1:])] * n
    return [tuple(shape)]


def transform(kind: str, arrays: list) -> mx.array:
    if kind == "conv":
        return arrays[0].transpose(0, 2, 3, 1)
    if kind == "pos":
        return arrays[0].reshape(arrays[0].shape[1:])
    if kind == "fuse":
        return mx.concatenate(arrays, axis=0)
    return arrays[0]


def _sources_for(layout: str, target: str) -> tuple[list, str]:
    for pattern, templates, kind in SHARED_RULES:
        m = re.fullmatch(pattern, target)
        if m:
            return [t.format(**m.groupdict()) for t in templates], kind
    prefix = TOWER_PREFIX[layout]
    for pattern, templates, kind in TOWER_RULES[layout]:
        m = re.fullmatch(pattern, target)
        if m:
            return [prefix + t.format(**m.groupdict()) for t in templates], kind
    raise AssertionError(f"no source rule for MLX parameter {target}")  # a bug, not user input


def _leftover_reason(layout: str, name: str, cfg: ModelConfig) -> tuple[str, str]:
    """('dropped'|'unexpected'|'separator', note) for a source tensor no parameter uses."""
    text = cfg.text_config
    if SEPARATOR.search(name):
        return "separator", ""
    if name == "lm_head.weight" and text["tie_word_embeddings"]:
        return "dropped", "tied to model.embed_tokens (tie_word_embeddings)"
    for pattern, reason in SHARED_UNUSED:
        if re.fullmatch(pattern, name):
            return "dropped", reason
    m = LLM_LAYER.match(name)
    if m and int(m.group(1)) >= text["num_hidden_layers"]:
        return "unexpected", f"config.json says {text['num_hidden_layers']} LLM layers"
    prefix = TOWER_PREFIX[layout]
    if name.startswith(prefix):
        rel = name[len(prefix):]
        for pattern, reason in UNUSED[layout]:
            if re.fullmatch(pattern, rel):
                return "dropped", reason
        m = BLOCK_INDEX[layout].match(rel)
        if m:
            i, k, n = int(m.group(1)), cfg.vision.feature_layer, cfg.vision.num_hidden_layers
            if k <= i < n:
                return "dropped", f"vision block {i} is past the feature layer ({k})"
            if i >= n:
                return "unexpected", f"the vision config says {n} layers"
    return "unexpected", ""


def plan(layout: str, shapes: dict, cfg: ModelConfig, param_shapes: dict,
         aliases: Optional[dict] = None) -> Plan:
    """Match every MLX parameter to its source tensors and check every shape.

    `shapes` is keyed by the names the rules read; `aliases` maps them to the checkpoint's
    own names, which the plan then uses (a missing tensor keeps the rules' name)."""
    p = _plan(layout, shapes, cfg, param_shapes)
    real = (aliases or {}).get
    for rule in p.rules:
        rule.sources = [real(n, n) for n in rule.sources]
    p.dropped = {real(n, n): v for n, v in p.dropped.items()}
    p.unexpected = {real(n, n): v for n, v in p.unexpected.items()}
    p.separators = [real(n, n) for n in p.separators]
    p.misshaped = [(real(n, n), e, a) for n, e, a in p.misshaped]
    return p


def _plan(layout: str, shapes: dict, cfg: ModelConfig, param_shapes: dict) -> Plan:
    p = Plan()
    used = set()
    for target, shape in param_shapes.items():
        sources, kind = _sources_for(layout, target)
        want = expected_source_shapes(kind, tuple(shape), len(sources))
        complete = True
        for src, exp in zip(sources, want):
            used.add(src)
            if src not in shapes:
                p.missing.append(src)
                complete = False
            elif tuple(shapes[src]) != tuple(exp):
                p.misshaped.append((src, tuple(exp), tuple(shapes[src])))
                complete = False
        if complete:
            p.rules.append(Rule(target, sources, kind))
    for name in shapes:
        if name in used:
            continue
        what, note = _leftover_reason(layout, name, cfg)
        if what == "dropped":
            p.dropped[name] = note
        elif what == "separator":
            p.separators.append(name)
        else:
            p.unexpected[name] = note
    return p


def report(p: Plan, shapes: dict) -> str:
    """The tensor report of a failed map: missing, mis-shaped, unexpected, separators."""
    lines = []
    if p.missing:
        lines.append(f"missing tensors ({len(p.missing)}):")
        lines += [f"  {n}" for n in _abbreviate(p.missing)]
    if p.misshaped:
        lines.append(f"tensors with the wrong shape ({len(p.misshaped)}): expected vs found")
        lines += [f"  {n}: expected {list(e)}, found {list(a)}" for n, e, a in p.misshaped[:60]]
        if len(p.misshaped) > 60:
            lines.append(f"  ... and {len(p.misshaped) - 60} more")
    if p.separators:
        lines.append("learned separator/newline tensors (the runtime's visual token order has "
                     "no separators; dropping them would change the model's answers):")
        lines += [f"  {n} {list(shapes[n])}" for n in p.separators]
    if p.unexpected:
        lines.append(f"unexpected tensors ({len(p.unexpected)}):")
        lines += [f"  {n} {list(shapes[n])}" + (f"  ({note})" if note else "")
                  for n, note in list(p.unexpected.items())[:60]]
        if len(p.unexpected) > 60:
            lines.append(f"  ... and {len(p.unexpected) - 60} more")
    return "\n".join(lines)


def group_dropped(dropped: dict) -> list:
    """[(pattern, count, reason)]: the dropped tensors by reason, names folded to a prefix."""
    by_reason: dict = {}
    for name, reason in dropped.items():
        by_reason.setdefault(reason, []).append(name)
    out = []
    for reason, names in by_reason.items():
        if len(names) == 1:
            out.append((names[0], 1, reason))
            continue
        prefix = os.path.commonprefix(names)
        prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else prefix
        out.append((prefix + "*", len(names), reason))
    return out


def _abbreviate(names: list, limit: int = 60) -> list:
    return names if len(names) <= limit else names[:limit] + [f"... and {len(names) - limit} more"]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what.replace('tensor', 'tensors')}"


def summary_line(p: Plan) -> str:
    """One sentence for the error's first line."""
    parts = []
    if p.missing:
        parts.append(_count(len(p.missing), "missing tensor"))
    if p.misshaped:
        parts.append(_count(len(p.misshaped), "tensor with the wrong shape"))
    if p.unexpected:
        parts.append(_count(len(p.unexpected), "unexpected tensor"))
    if p.separators:
        parts.append("learned separator/newline tensors the runtime has no place for ("
                     + ", ".join(p.separators[:3]) + (", ..." if len(p.separators) > 3 else "") + ")")
    return "checkpoint does not match its config: " + ", ".join(parts)
