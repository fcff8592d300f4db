"""A whole tiny source checkpoint: config.json, tensors, tokenizer and preprocessor files.

What to build is said in four small typed parts, each with the defaults of the test suite's
tiny model (tests/conftest.py's SHARPEN is tuned on these sizes: change them and the
mistake tests lose their teeth):

- `LLM`: the Qwen2 language model's sizes, tying and RoPE base;
- `Tower`: the vision tower's sizes and the optional parts its layout may carry;
- `Files`: how the checkpoint is stored (dtype, shards, pickle, which config style);
- `Extras`: LLaVA's recipe fields and deliberate departures (tensors or keys added or
  dropped), for the converter's refusal tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
ROPE_STYLES = ("rope_theta", "rope_parameters")


@dataclass(frozen=True)
class LLM:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab_size: Optional[int] = None  # default: the tokenizer's, padded to a multiple of 64
    tokenizer_vocab: int = 640
    tied: bool = True
    rope_theta: float = 1000000.0

    def vocab(self, n_tokens: int) -> int:
        vocab = self.vocab_size or -(-n_tokens // 64) * 64
        if vocab < n_tokens:
            raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tokens})")
        return vocab


@dataclass(frozen=True)
class Tower:
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 32
    layers: int = 3
    heads: int = 2
    mlp: int = 64
    act: Optional[str] = None  # default: the layout's (gelu_pytorch_tanh for SigLIP, else gelu)
    pos_grid: Optional[int] = None  # G0 of the learned position table (default: image // patch)
    post_layernorm: bool = True  # llava-siglip only
    siglip_head: bool = False  # llava-siglip only: SiglipMultiheadAttentionPoolingHead
    final_norm: bool = False  # oryx-vit only

    @property
    def grid(self) -> int:
        return self.pos_grid or self.image_size // self.patch_size


@dataclass(frozen=True)
class Files:
    dtype: str = "float32"
    shards: int = 1
    pickle: bool = False  # pytorch_model.bin by torch.save (needs torch), for --allow-pickle
    rope_style: str = "rope_theta"  # transformers 4; "rope_parameters": transformers 5
    vision_config: bool = True  # a `vision_config` block in config.json
    preprocessor: bool = True  # preprocessor_config.json
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Extras:
    model_type: str = "llava"
    select_layer: Optional[int] = None  # mm_vision_select_layer; None: the layout's (-1 / -2)
    vision_tower: Optional[str] = None  # mm_vision_tower; None: the layout's usual name
    tensors: dict = field(default_factory=dict)  # {name: ndarray or shape}, added as they are
    drop_tensors: Iterable[str] = ()
    config: dict = field(default_factory=dict)  # config.json fields set last
    drop_config: Iterable[str] = ()


# ----------------------------------------------------------------------------------------
# The checkpoint


def write_source_checkpoint(path, layout: str = "oryx-vit", *, llm: LLM = LLM(),
                            tower: Tower = Tower(), files: Files = Files(),
                            extras: Extras = Extras(), seed: int = 0, std: float = 0.05) -> Path:
    """Write a tiny SF-LLaVA-1.5 source checkpoint with HF names to `path`; return it.

    layout: "oryx-vit" (timm names, fused qkv, pos_embed (1, G0*G0, Dv)) or
      "llava-siglip" (HF SigLIP names under `vision_model.`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if files.dtype not in ST_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(ST_DTYPES)}")
    if files.rope_style not in ROPE_STYLES:
        raise ValueError("rope_style must be 'rope_theta' or 'rope_parameters'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(path, llm.tokenizer_vocab)
    ids = {t: n_tok - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab = llm.vocab(n_tok)

    shapes = tensor_shapes(layout, llm, tower, vocab)
    shapes.update({n: v.shape if isinstance(v, np.ndarray) else tuple(v)
                   for n, v in extras.tensors.items()})
    for name in extras.drop_tensors:
        shapes.pop(name, None)

    def make(name, shape):
        value = extras.tensors.get(name)
        if isinstance(value, np.ndarray):
            return value.astype(np.float32)
        return make_tensor(seed, name, shape, std)

    if files.pickle:
        _write_pickle(path / "pytorch_model.bin", shapes, make, files.dtype)
    else:
        write_weights(path, shapes, make, files.dtype, files.shards)
    write_json(path / "config.json", config_json(layout, llm, tower, files, extras, ids, vocab))
    write_json(path / "generation_config.json",
               {"bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})
    if files.preprocessor:
        write_json(path / "preprocessor_config.json", preprocessor_json(tower, files))
    return path


def tensor_shapes(layout: str, llm: LLM, tower: Tower, vocab: int) -> dict:
    """{HF name: shape} of the LLM, the projector and the layout's tower."""
    shapes = llm_shapes(hidden=llm.hidden, llm_layers=llm.layers, heads=llm.heads,
                        kv_heads=llm.kv_heads, intermediate=llm.intermediate, vocab=vocab,
                        tied=llm.tied)
    shapes.update(projector_shapes(vision_hidden=tower.hidden, hidden=llm.hidden))
    sizes = dict(vision_hidden=tower.hidden, vision_layers=tower.layers, vision_mlp=tower.mlp,
                 patch_size=tower.patch_size, pos_grid=tower.grid)
    if layout == "llava-siglip":
        shapes.update(siglip_shapes(**sizes, post_layernorm=tower.post_layernorm,
                                    siglip_head=tower.siglip_head))
    else:
        shapes.update(oryx_shapes(**sizes, final_norm=tower.final_norm))
    return shapes


def write_weights(path: Path, shapes: dict, make, dtype: str, shards: int = 1) -> None:
    """model.safetensors, or `shards` files and their index, as save_pretrained names them."""
    if shards <= 1:
        write_safetensors(path / "model.safetensors", shapes, make, dtype)
        return
    groups = split_shards(shapes, shards)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        total += write_safetensors(path / fname, group, make, dtype)
        weight_map.update({name: fname for name in group})
    write_json(path / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def config_json(layout: str, llm: LLM, tower: Tower, files: Files, extras: Extras, ids: dict,
                vocab: int) -> dict:
    """Qwen2 fields + LLaVA's mm_* fields, as LLaVA-NeXT's LlavaQwen checkpoints carry them
    (lmms-lab/llava-onevision-qwen2-*: model_type "llava", LlavaQwenForCausalLM)."""
    siglip = layout == "llava-siglip"
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": extras.model_type,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": llm.hidden,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_hidden_layers": llm.layers,
        "num_key_value_heads": llm.kv_heads,
        "rms_norm_eps": 1e-06,
        "sliding_window": 32768,
        "tie_word_embeddings": llm.tied,
        "torch_dtype": files.dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": tower.hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": (extras.select_layer if extras.select_layer is not None
                                   else (-2 if siglip else -1)),
        "mm_vision_tower": extras.vision_tower or (SIGLIP_SO400M if siglip else "oryx_vit:oryx_vit.pth"),
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
    }
    if files.rope_style == "rope_theta":
        config["rope_theta"] = llm.rope_theta
    else:  # transformers 5 names
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": llm.rope_theta}
        config["dtype"] = config.pop("torch_dtype")
    if files.vision_config:
        config["vision_config"] = {
            "model_type": "siglip_vision_model",
            "hidden_size": tower.hidden,
            "intermediate_size": tower.mlp,
            "num_hidden_layers": tower.layers,
            "num_attention_heads": tower.heads,
            "num_channels": 3,
            "image_size": tower.image_size,
            "patch_size": tower.patch_size,
            "hidden_act": tower.act or ("gelu_pytorch_tanh" if siglip else "gelu"),
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
        }
    config.update(extras.config)
    for key in extras.drop_config:
        config.pop(key, None)
    return config


def preprocessor_json(tower: Tower, files: Files) -> dict:
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(files.image_mean),
        "image_std": list(files.image_std),
        "image_processor_type": "SiglipImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": tower.image_size, "width": tower.image_size},
    }


def _write_pickle(path: Path, shapes: dict, make, dtype: str) -> None:
    import torch  # only for the pickle variant, which exists to test --allow-pickle

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    state = {n: torch.from_numpy(np.ascontiguousarray(make(n, s))).to(tdtype) for n, s in shapes.items()}
    torch.save(state, path)


# Factors applied to the random source tensors (so a tiny model's answers follow its input). q/k: peaked attention;
# v/o: attention output dominates the residual stream; embeddings (tied with lm_head): peaked
# next-token distributions; projector output: visual tokens as loud as text tokens.
SHARPEN = {
    r"self_attn\.(q|k)_proj\.weight$": 6.0,
    r"self_attn\.(v|o)_proj\.weight$": 4.0,
    r"embed_tokens\.weight$": 10.0,
    r"mm_projector\.2\.weight$": 4.0,
}


def sharpen(src: Path, rules: dict = SHARPEN) -> None:
    """Rescale tensors of a single-file safetensors source checkpoint in place."""
    import re

    import numpy as np
    from safetensors.numpy import load_file, save_file

    f = src / "model.safetensors"
    tensors = load_file(str(f))
    for pattern, factor in rules.items():
        hits = [n for n in tensors if re.search(pattern, n)]
        assert hits, f"sharpen: no tensor matches {pattern}"
        for n in hits:
            tensors[n] = (tensors[n] * np.float32(factor)).astype(np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
