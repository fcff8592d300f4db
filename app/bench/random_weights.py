"""SF-LLaVA-1.5 and LLaVA-OneVision at their real shapes with random weights: profiling
without a download.

    from sfllava_app.bench.random_weights import random_model
    model, tokenizer = random_model("1.5b", dtype=mx.float32, q_bits=4)
    model, tokenizer = random_model("ov-0.5b")   # LLaVA-OneVision, native and slowfast recipes

The model is the runtime's own `SFLLaVA` with the config a converted checkpoint of that
family has, so every matmul has the shape and width a real one would have:
- SF-LLaVA-1.5 (`1.5b`, `3b`, `7b`): Oryx-ViT tower (27 blocks, 1152 wide, patch 16, 384 px),
  `mlp2x_gelu` projector, the Qwen2.5 LLM of the chosen size; one recipe (SlowFast, 128 frames).
- LLaVA-OneVision (`ov-0.5b`, `ov-7b`: llava-onevision-qwen2-*-ov): layout `llava-hf`, SigLIP
  so400m with the 26 blocks the checkpoints store (1152 wide, 16 heads, MLP 4304, patch 14 at
  384 px: grid 27 = the position table, tanh GELU, feature = last stored block, no
  post-LayerNorm), `mlp2x_gelu` projector, a learned `image_newline`, the Qwen2 LLM of the
  size; recipes native (32 linspace frames, bilinear pool to 14 x 14, one newline: 6,273
  tokens) and slowfast (32 x 14 x 14 + 96 x 7 x 7 + 1 = 10,977), as the converter writes them.
MLX initialises parameters randomly and lazily: the size of the model is known from the lazy
parameters before any memory is taken, and a machine too small for it is told so
(`UserError`) before allocating.

The tokenizer is the small Qwen2-style BPE of `sfllava_convert.tiny`; the random LLM can emit ids
that vocabulary lacks and has no meaningful end token, so the returned tokenizer decodes
unknown ids to nothing and has no end tokens: every answer runs to `max_tokens`, as a
benchmark wants.
"""

from __future__ import annotations

import json
import tempfile
from typing import TYPE_CHECKING, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from sfllava_mlx.config import (
    ModelConfig,
    PreprocessConfig,
    ProjectorConfig,
    PromptConfig,
    VisionConfig,
    family_recipes,
)
from sfllava_mlx.errors import UserError

if TYPE_CHECKING:  # the runtime (mlx-lm) is imported when a model is built, not for --help
    from sfllava_mlx.model import SFLLaVA
from sfllava_mlx.tokens import num_visual_tokens

# One table a family: size -> the LLM's shape (mlx-lm qwen2 ModelArgs fields).
# Qwen2.5 LLMs of SF-LLaVA-1.5 (design.md §1): 1B = Qwen2.5-1.5B, 3B, 7B.
QWEN25 = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
               tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
}
# Qwen2 LLMs of LLaVA-OneVision (llava-onevision-qwen2-0.5b-ov / -7b-ov, as the llava-hf
# repos' text_config holds them).
ONEVISION = {
    "ov-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                    tie_word_embeddings=True),
    "ov-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                  tie_word_embeddings=False),
}
QWEN25_COMMON = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
                     max_position_embeddings=32768)
# size -> (family, its table, the name a report gives it)
FAMILIES = {**{s: ("sf-llava-1.5", QWEN25, f"SF-LLaVA-1.5 {s}") for s in QWEN25},
            **{s: ("llava-onevision", ONEVISION, f"LLaVA-OneVision {s[3:]}") for s in ONEVISION}}
SIZES = tuple(FAMILIES)

# SigLIP so400m as LLaVA-OneVision's checkpoints hold it (llava-hf vision_config): 26 of its
# 27 blocks stored, feature = the last stored block's output, no post-LayerNorm.
ONEVISION_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                        num_attention_heads=16, image_size=384, patch_size=14,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pos_grid=27,
                        pos_interpolation="bicubic", feature_layer=26)


def display_name(size: str) -> str:
    """How a report names a random-weight size, e.g. "LLaVA-OneVision 0.5b"."""
    return FAMILIES[size][2]


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def model_config(size: str = "1.5b", num_frames: Optional[int] = None,
                 dtype: str = "float32") -> ModelConfig:
    """The converted-model config of `size` (its family's layout, tower and recipes).

    num_frames: replaces the native recipe's T (default: the family's, 128 / 32)."""
    if size not in FAMILIES:
        raise UserError(f"unknown model size {size!r}: choose one of {', '.join(SIZES)}")
    family, table, _ = FAMILIES[size]
    text = {**QWEN25_COMMON, **table[size]}
    if family == "llava-onevision":
        layout = "llava-hf"
        vision = VisionConfig(**ONEVISION_VISION)
        recipes = family_recipes(family, "bilinear", "one_token")
    else:
        layout = "oryx-vit"
        vision = VisionConfig()  # Oryx-ViT's defaults: 1152 wide, 27 blocks, patch 16, 384 px
        recipes = family_recipes(family)
    if num_frames is not None:
        recipes["native"].num_frames = num_frames
    return ModelConfig(
        layout=layout,
        text_config=text,
        vision=vision,
        projector=ProjectorConfig(input_size=vision.hidden_size, hidden_size=text["hidden_size"],
                                  image_newline=family != "sf-llava-1.5"),
        recipes=recipes,
        preprocess=PreprocessConfig(image_size=vision.image_size),
        prompt=PromptConfig(),
        dtype=dtype,
        source={"random_weights": size},
        family=family,
    )


def as_dtype(dtype: Union[str, mx.Dtype, None]) -> mx.Dtype:
    if dtype is None:
        return mx.float32 if mx.default_device() == mx.cpu else mx.float16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def quantize_language_model(model: SFLLaVA, bits: int, group_size: int = 64) -> None:
    """Quantize the LLM's linear and embedding layers as mlx-lm does (the tower stays)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {bits}: MLX quantizes to 2, 3, 4, 5, 6 or 8 bits")
    nn.quantize(model.language_model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and m.weight.shape[-1] % group_size == 0)
    model.config.quantization = {"group_size": group_size, "bits": bits}


def check_fits(model: SFLLaVA, visual_tokens: int, what: str) -> None:
    """The memory plan of the longest video `model` will see, before its weights exist."""
    from sfllava_mlx.memory import check, plan_tokens

    check(plan_tokens(model, visual_tokens, 8),
          what, lambda: ["a smaller size, fewer bits (-q) or fewer frames"])


def random_model(size: str = "1.5b", dtype=mx.float32, q_bits: Optional[int] = None,
                 q_group_size: int = 64, num_frames: Optional[int] = None, seed: int = 0,
                 visual_tokens: Optional[int] = None):
    """A model of `size` (SIZES) with its real shapes and random weights -> (model, tokenizer).

    dtype: float32 / float16 / bfloat16 (or an mx.Dtype); q_bits quantizes the LLM only.
    num_frames: the native recipe's T (default: the family's).
    visual_tokens: the longest video to budget for (default: the longest recipe's).
    Raises UserError before allocating when the machine is too small.
    """
    dtype = as_dtype(dtype)
    config = model_config(size, num_frames=num_frames, dtype=dtype_name(dtype))
    label = f"{display_name(size)} ({dtype_name(dtype)}{f', {q_bits}-bit LLM' if q_bits else ''})"
    model = build_random(config, dtype, q_bits, q_group_size, seed, visual_tokens, label)
    return model, random_tokenizer()


def build_random(config: ModelConfig, dtype=mx.float32, q_bits: Optional[int] = None,
                 q_group_size: int = 64, seed: int = 0, visual_tokens: Optional[int] = None,
                 label: str = "the model") -> SFLLaVA:
    """An SFLLaVA of any config with random weights (checked to fit, then allocated)."""
    dtype = as_dtype(dtype)
    from sfllava_mlx.model import SFLLaVA, cast_model

    model = SFLLaVA(config)  # lazy: MLX's own initialisers never run, fill_random replaces them
    fill_random(model, seed)
    cast_model(model, dtype)
    if q_bits:
        quantize_language_model(model, q_bits, q_group_size)
    if visual_tokens is None:
        visual_tokens = max(num_visual_tokens(config.vision.grid, r) for r in config.recipes.values())
    check_fits(model, visual_tokens, label)
    materialize(model)
    model.eval()
    model.path = None  # no files: the video cache keys on `identity` instead
    model.identity = (f"random:{config.family}:{json.dumps(config.text_config, sort_keys=True)}:"
                      f"{dtype_name(dtype)}:q{q_bits or 0}/{q_group_size}:seed{seed}")
    return model


def fill_random(model: nn.Module, seed: int = 0, period: int = 65521) -> None:
    """Replace every weight matrix by uniform values scaled by 1/sqrt(fan-in), lazily.

    Drawing 2-8 billion numbers with MLX's generator takes minutes on a CPU; timing does
    not need independent draws, so each tensor repeats one random block of `period`
    values (a prime, so rows do not line up into a low-rank pattern). Norm scales stay 1,
    biases and the position table 0.
    """
    base = mx.random.uniform(-1.0, 1.0, (period,), key=mx.random.key(seed))

    def fill(path, p):
        if not path.endswith("weight") or p.ndim < 2:
            return p
        n = p.size
        x = mx.tile(base, (-(-n // period),))[:n].reshape(p.shape)
        fan_in = n // p.shape[0]
        return x * (fan_in ** -0.5)

    model.update(tree_map_with_path(fill, model.parameters()))


def materialize(model: SFLLaVA) -> None:
    """Evaluate the lazy random parameters a block at a time: the float32 draws behind a
    cast or a quantization live one block at a time, never the whole model's."""
    parts = [*model.vision_tower.blocks, *model.language_model.model.layers]
    for part in parts:
        mx.eval(part.parameters())
    mx.eval(model.parameters())


def random_tokenizer():
    """The tiny Qwen2-style tokenizer, decoding any id, with no end tokens."""
    from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer, TokenizerWrapper
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from sfllava_convert.tiny import write_tokenizer

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="sfllava-tok-") as tmp:
            write_tokenizer(tmp)
            hf = AutoTokenizer.from_pretrained(tmp)
    finally:
        logging.set_verbosity(level)
    # Ids past the small vocabulary decode to "" with the naive detokenizer (the BPE one
    # indexes a table of the vocabulary's size).
    wrapper = TokenizerWrapper(hf, NaiveStreamingDetokenizer)
    wrapper.eos_token_ids = []
    return wrapper
