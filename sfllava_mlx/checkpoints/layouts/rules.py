"""The name and shape map: for every parameter of `SFLLaVA(config)` the source tensor(s) it
is made of and how, and the report of what a checkpoint leaves over."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from ...config import ModelConfig
from ...errors import CheckpointError
from .names import HF, NEWLINE, ORYX, ORYX_PREFIX, SEPARATOR, SIGLIP, SIGLIP_PREFIX, canonical_names

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
class TensorMap:
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


def map_tensors(layout: str, shapes: dict, cfg: ModelConfig, param_shapes: dict,
         aliases: Optional[dict] = None) -> TensorMap:
    """Match every MLX parameter to its source tensors and check every shape.

    `shapes` is keyed by the names the rules read; `aliases` maps them to the checkpoint's
    own names, which the map then uses (a missing tensor keeps the rules' name)."""
    p = _map_tensors(layout, shapes, cfg, param_shapes)
    real = (aliases or {}).get
    for rule in p.rules:
        rule.sources = [real(n, n) for n in rule.sources]
    p.dropped = {real(n, n): v for n, v in p.dropped.items()}
    p.unexpected = {real(n, n): v for n, v in p.unexpected.items()}
    p.separators = [real(n, n) for n in p.separators]
    p.misshaped = [(real(n, n), e, a) for n, e, a in p.misshaped]
    return p


def _map_tensors(layout: str, shapes: dict, cfg: ModelConfig, param_shapes: dict) -> TensorMap:
    p = TensorMap()
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


def report(p: TensorMap, shapes: dict) -> str:
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


def summary_line(p: TensorMap) -> str:
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


# ----------------------------------------------------------------------------------------
# The llava-hf names stored by MLX (mlx-vlm's conversions), mapped at load time

# mlx-vlm's names that are never ours (ours: language_model.*, vision_tower.{patch_embed,...})
STORED_HF_MARKERS = ("multi_modal_projector.", "vision_tower.vision_model.")
# MLX already holds the patch embedding in its own (O, H, W, I) order
STORED_KINDS = {"conv": "copy"}
QUANT_PARTS = ("scales", "biases")  # beside each weight mlx-vlm quantized


def _with_quant_parts(target: str, sources: list, present) -> list:
    """[(target, sources)], plus the .scales/.biases pairs where the file quantized it."""
    out = [(target, sources)]
    if target.endswith(".weight") and all(s[:-6] + "scales" in present for s in sources):
        out += [(target[:-6] + part, [s[:-6] + part for s in sources]) for part in QUANT_PARTS]
    return out


def stored_hf_weights(weights: dict, cfg: ModelConfig, param_names) -> dict:
    """{our name: array} from a file in llava-hf names written by MLX (mlx-vlm), through
    the table `convert` reads; a tensor left over must be one it knows to be unused."""
    aliases = canonical_names(HF, weights)  # rules' name -> the file's
    out, used, missing = {}, set(), []
    for target in param_names:
        sources, kind = _sources_for(HF, target)
        for name, srcs in _with_quant_parts(target, sources, aliases):
            absent = [s for s in srcs if s not in aliases]
            missing += absent
            used.update(srcs)
            if not absent:
                arrays = [weights[aliases[s]] for s in srcs]
                out[name] = transform(STORED_KINDS.get(kind, kind), arrays)
    p = TensorMap(missing=[aliases.get(n, n) for n in missing])
    for name in aliases:
        if name not in used:
            what, note = _leftover_reason(HF, name.rsplit(".", 1)[0] + ".weight"
                                          if name.endswith(QUANT_PARTS) else name, cfg)
            if what != "dropped":
                p.unexpected[aliases[name]] = note
    if not p.ok:
        raise CheckpointError(summary_line(p), details=report(
            p, {k: tuple(v.shape) for k, v in weights.items()}))
    return out
