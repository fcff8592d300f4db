"""What a checkpoint's config.json and tensors say the model is: the vision tower, the LLM,
preprocessing, pictures and the family's recipes (design.md §2.1), as a ModelConfig."""

from __future__ import annotations

import math
import re
from typing import Optional

from ...config import (
    ONEVISION_PINPOINTS,
    ImageConfig,
    ModelConfig,
    PreprocessConfig,
    ProjectorConfig,
    PromptConfig,
    VisionConfig,
    family_recipes,
)
from ...errors import CheckpointError
from .names import (
    DEFAULT_FEATURE_LAYER,
    GELU_NAMES,
    HF,
    HF_SIGLIP_DEFAULTS,
    HF_VISION_FIELDS,
    KNOWN_SIGLIP_TOWERS,
    NEWLINE,
    ORYX,
    ORYX_DEFAULTS,
    ORYX_PREFIX,
    POS_INTERPOLATION,
    SIGLIP,
    SIGLIP_PREFIX,
)

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
    stored: LLaVA-NeXT's files hold one block fewer than so400m and say -2 (design.md §5.2).
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
        recipes=recipes,
        preprocess=preprocess,
        prompt=PromptConfig(),
        source={"layout": layout, "feature_layer": raw_layer},
        family=family,
        image=image_config(layout, config, family, vcfg, preprocess, image_preprocessor),
    )


# ----------------------------------------------------------------------------------------
# Pictures (design.md §2.3): the `image` section of config.json

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
# Recipes (design.md §2.1): what each family's frames become, written into config.json

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
