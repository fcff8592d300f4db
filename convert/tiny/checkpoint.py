"""A whole tiny source checkpoint: config.json, tensors, tokenizer and preprocessor files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from .tensors import (
    LAYOUTS,
    ST_DTYPES,
    llm_shapes,
    make_tensor,
    oryx_shapes,
    projector_shapes,
    siglip_shapes,
    split_shards,
    write_json,
    write_safetensors,
)
from .tokenizer import SPECIAL_TOKENS, write_tokenizer

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"

# ----------------------------------------------------------------------------------------
# The checkpoint


def write_source_checkpoint(
    path,
    layout: str = "oryx-vit",
    *,
    seed: int = 0,
    tied: bool = True,
    rope_style: str = "rope_theta",
    rope_theta: float = 1000000.0,
    shards: int = 1,
    vision_config_in_config: bool = True,
    dtype: str = "float32",
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    vision_mlp: int = 64,
    vision_act: Optional[str] = None,
    pos_grid: Optional[int] = None,
    hidden: int = 64,
    llm_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: Optional[int] = None,
    tokenizer_vocab: int = 640,
    mm_vision_select_layer: Optional[int] = None,
    mm_vision_tower: Optional[str] = None,
    post_layernorm: bool = True,
    siglip_head: bool = False,
    final_norm: bool = False,
    std: float = 0.05,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    preprocessor: bool = True,
    extra_tensors: Optional[dict] = None,
    drop_tensors: Iterable[str] = (),
    extra_config: Optional[dict] = None,
    drop_config_keys: Iterable[str] = (),
    model_type: str = "llava",
    pickle: bool = False,
) -> Path:
    """Write a tiny SF-LLaVA-1.5 source checkpoint with HF names to `path`; return it.

    layout: "oryx-vit" (timm names, fused qkv, pos_embed (1, G0*G0, Dv)) or
      "llava-siglip" (HF SigLIP names under `vision_model.`).
    pos_grid: G0 of the learned position table (default image_size // patch_size).
    mm_vision_select_layer: written to config.json; None writes the layout's usual
      value (-1 for oryx-vit, -2 for llava-siglip). Drop the key with
      drop_config_keys=("mm_vision_select_layer",).
    rope_style: "rope_theta" (transformers 4) or "rope_parameters" (transformers 5).
    vocab_size: the LLM's vocabulary (default: the tokenizer's, padded to a multiple of 64).
    extra_tensors: {name: ndarray or shape tuple} added as they are (e.g. a learned
      `model.image_newline`); drop_tensors: names left out.
    pickle: write `pytorch_model.bin` with torch.save instead of safetensors (needs torch).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if dtype not in ST_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(ST_DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    siglip = layout == "llava-siglip"
    pos_grid = pos_grid or image_size // patch_size
    vision_act = vision_act or ("gelu_pytorch_tanh" if siglip else "gelu")

    n_tok = write_tokenizer(path, tokenizer_vocab)
    ids = {t: n_tok - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab = vocab_size or -(-n_tok // 64) * 64
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tok})")

    # --- tensors
    shapes = llm_shapes(hidden=hidden, llm_layers=llm_layers, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, vocab=vocab, tied=tied)
    shapes.update(projector_shapes(vision_hidden=vision_hidden, hidden=hidden))
    vargs = dict(vision_hidden=vision_hidden, vision_layers=vision_layers, vision_mlp=vision_mlp,
                 patch_size=patch_size, pos_grid=pos_grid)
    if siglip:
        shapes.update(siglip_shapes(**vargs, post_layernorm=post_layernorm, siglip_head=siglip_head))
    else:
        shapes.update(oryx_shapes(**vargs, final_norm=final_norm))
    fixed = {}
    for name, value in (extra_tensors or {}).items():
        if isinstance(value, np.ndarray):
            fixed[name] = value.astype(np.float32)
            shapes[name] = value.shape
        else:
            shapes[name] = tuple(value)
    for name in drop_tensors:
        shapes.pop(name, None)

    def make(name, shape):
        if name in fixed:
            return fixed[name]
        return make_tensor(seed, name, shape, std)

    if pickle:
        _write_pickle(path / "pytorch_model.bin", shapes, make, dtype)
    elif shards <= 1:
        write_safetensors(path / "model.safetensors", shapes, make, dtype)
    else:
        groups = split_shards(shapes, shards)
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            total += write_safetensors(path / fname, group, make, dtype)
            weight_map.update({name: fname for name in group})
        write_json(path / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})

    # --- config.json: Qwen2 fields + LLaVA's mm_* fields, as LLaVA-NeXT's LlavaQwen checkpoints
    # carry them (lmms-lab/llava-onevision-qwen2-*: model_type "llava", LlavaQwenForCausalLM)
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": model_type,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": llm_layers,
        "num_attention_heads": heads,
        "num_hidden_layers": llm_layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": (mm_vision_select_layer if mm_vision_select_layer is not None
                                   else (-2 if siglip else -1)),
        "mm_vision_tower": mm_vision_tower or (SIGLIP_SO400M if siglip else "oryx_vit:oryx_vit.pth"),
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
    }
    if rope_style == "rope_theta":
        config["rope_theta"] = rope_theta
    elif rope_style == "rope_parameters":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
        config["dtype"] = config.pop("torch_dtype")
    else:
        raise ValueError("rope_style must be 'rope_theta' or 'rope_parameters'")
    if vision_config_in_config:
        config["vision_config"] = {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_mlp,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": vision_act,
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
        }
    config.update(extra_config or {})
    for key in drop_config_keys:
        config.pop(key, None)
    write_json(path / "config.json", config)
    write_json(path / "generation_config.json",
                {"bos_token_id": ids["<|endoftext|>"],
                 "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})

    if preprocessor:
        write_json(path / "preprocessor_config.json", {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(image_mean),
            "image_std": list(image_std),
            "image_processor_type": "SiglipImageProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        })
    return path


def _write_pickle(path: Path, shapes: dict, make, dtype: str) -> None:
    import torch  # only for the pickle variant, which exists to test --allow-pickle

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    state = {n: torch.from_numpy(np.ascontiguousarray(make(n, s))).to(tdtype) for n, s in shapes.items()}
    torch.save(state, path)
