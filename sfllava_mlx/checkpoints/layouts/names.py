"""The layouts of design.md §5.2 by their names: the prefixes each uses, the tower defaults each
implies, and detecting which one a checkpoint is."""

from __future__ import annotations

import re

from ...errors import CheckpointError

ORYX = "oryx-vit"
SIGLIP = "llava-siglip"
HF = "llava-hf"  # transformers' LlavaOnevisionForConditionalGeneration
LAYOUTS = (ORYX, SIGLIP, HF)

TOWER = "model.vision_tower.vision_tower."
SIGLIP_PREFIX = TOWER + "vision_model."
ORYX_PREFIX = TOWER
NEWLINE = "model.image_newline"

# llava-hf names -> the LLaVA names the rules below read (first matching prefix wins), so
# the three namings of design.md §5.2 (2024 hub files, transformers 5's save_pretrained, the
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

# Hugging Face SigLIP vision_config field names (design.md §5.2).
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

# Learned separator / newline vectors: never dropped silently (design.md §1.6).
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
