"""The tiny checkpoints' tensors: Hugging Face names and shapes per layout, deterministic
random values per (seed, name), and safetensors files written tensor by tensor."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

LAYOUTS = ("oryx-vit", "llava-siglip")

PROJECTOR_PREFIX = "model.mm_projector."
SIGLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
ORYX_PREFIX = "model.vision_tower.vision_tower."


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _tensor_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return "norm"
    if leaf == "bias":
        return "bias"
    return "weight"


def make_tensor(seed: int, name: str, shape, std: float) -> np.ndarray:
    """Initialiser-like random values: N(0, std) weights, ~1 norm scales, small biases."""
    g = _rng(seed, name)
    kind = _tensor_kind(name)
    x = g.standard_normal(shape, dtype=np.float32)
    if kind == "norm":
        return 1.0 + np.float32(0.1) * x
    if kind == "bias":
        return np.float32(0.02) * x
    return np.float32(std) * x


def llm_shapes(*, hidden, llm_layers, heads, kv_heads, intermediate, vocab, tied):
    head_dim = hidden // heads
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(llm_layers):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        s[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
        s[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        s[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
        s[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        s[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        s[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        s[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        s[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        s[p + "input_layernorm.weight"] = (hidden,)
        s[p + "post_attention_layernorm.weight"] = (hidden,)
    s["model.norm.weight"] = (hidden,)
    if not tied:
        s["lm_head.weight"] = (vocab, hidden)
    return s


def projector_shapes(*, vision_hidden, hidden):
    return {
        PROJECTOR_PREFIX + "0.weight": (hidden, vision_hidden),
        PROJECTOR_PREFIX + "0.bias": (hidden,),
        PROJECTOR_PREFIX + "2.weight": (hidden, hidden),
        PROJECTOR_PREFIX + "2.bias": (hidden,),
    }


def _linear(s, name, out_dim, in_dim):
    s[name + ".weight"] = (out_dim, in_dim)
    s[name + ".bias"] = (out_dim,)


def _norm(s, name, dim):
    s[name + ".weight"] = (dim,)
    s[name + ".bias"] = (dim,)


def siglip_shapes(*, vision_hidden, vision_layers, vision_mlp, patch_size, pos_grid,
                  post_layernorm=True, siglip_head=False):
    """HF SiglipVisionModel names under SIGLIP_PREFIX."""
    d, p = vision_hidden, SIGLIP_PREFIX
    s = {
        p + "embeddings.patch_embedding.weight": (d, 3, patch_size, patch_size),
        p + "embeddings.patch_embedding.bias": (d,),
        p + "embeddings.position_embedding.weight": (pos_grid * pos_grid, d),
    }
    for i in range(vision_layers):
        b = f"{p}encoder.layers.{i}."
        _norm(s, b + "layer_norm1", d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, b + "self_attn." + proj, d, d)
        _norm(s, b + "layer_norm2", d)
        _linear(s, b + "mlp.fc1", vision_mlp, d)
        _linear(s, b + "mlp.fc2", d, vision_mlp)
    if post_layernorm:
        _norm(s, p + "post_layernorm", d)
    if siglip_head:  # SiglipMultiheadAttentionPoolingHead
        s[p + "head.probe"] = (1, 1, d)
        s[p + "head.attention.in_proj_weight"] = (3 * d, d)
        s[p + "head.attention.in_proj_bias"] = (3 * d,)
        _linear(s, p + "head.attention.out_proj", d, d)
        _norm(s, p + "head.layernorm", d)
        _linear(s, p + "head.mlp.fc1", vision_mlp, d)
        _linear(s, p + "head.mlp.fc2", d, vision_mlp)
    return s


def oryx_shapes(*, vision_hidden, vision_layers, vision_mlp, patch_size, pos_grid,
                final_norm=False):
    """Oryx-ViT (timm) names under ORYX_PREFIX."""
    d, p = vision_hidden, ORYX_PREFIX
    s = {
        p + "patch_embed.proj.weight": (d, 3, patch_size, patch_size),
        p + "patch_embed.proj.bias": (d,),
        p + "pos_embed": (1, pos_grid * pos_grid, d),
    }
    for i in range(vision_layers):
        b = f"{p}blocks.{i}."
        _norm(s, b + "norm1", d)
        _linear(s, b + "attn.qkv", 3 * d, d)
        _linear(s, b + "attn.proj", d, d)
        _norm(s, b + "norm2", d)
        _linear(s, b + "mlp.fc1", vision_mlp, d)
        _linear(s, b + "mlp.fc2", d, vision_mlp)
    if final_norm:
        _norm(s, p + "norm", d)
    return s


# ----------------------------------------------------------------------------------------
# safetensors writing (by hand: numpy has no bfloat16, and big files stream tensor by tensor)

ST_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def _to_bytes(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.tobytes()
    if dtype == "float16":
        return x.astype(np.float16).tobytes()
    # bfloat16: round-to-nearest-even on the upper 16 bits of float32
    u = x.view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16).tobytes()


def write_safetensors(path: Path, shapes: dict, make, dtype: str) -> int:
    """Write tensors `make(name, shape) -> float32 ndarray` to one safetensors file.

    Returns the number of data bytes. Tensors are produced and written one at a time.
    """
    code, size = ST_DTYPES[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in shapes.items():
            f.write(_to_bytes(make(name, shape), dtype))
    return offset


def split_shards(shapes: dict, shards: int) -> list[dict]:
    """Split into `shards` groups of roughly equal element count, keeping order."""
    total = sum(int(np.prod(s)) for s in shapes.values())
    groups, acc = [{}], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if groups[-1] and acc >= total * len(groups) / shards and len(groups) < shards:
            groups.append({})
        groups[-1][name] = shape
        acc += n
    while len(groups) < shards:  # more shards than tensors would split: keep them non-empty
        big = max(range(len(groups)), key=lambda i: len(groups[i]))
        items = list(groups[big].items())
        if len(items) < 2:
            break
        half = len(items) // 2
        groups[big] = dict(items[:half])
        groups.insert(big + 1, dict(items[half:]))
    return groups


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_tensors(file) -> dict:
    """One safetensors file as float32 numpy arrays (bfloat16 included), read by MLX."""
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(file)).items()}


def read_source_tensors(path) -> dict:
    """All tensors of a safetensors checkpoint directory, as float32 numpy (for tests)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(read_tensors(f))
    return out
