"""The SF-LLaVA-1.5 model: vision tower, projector and a Qwen2 LLM from mlx-lm."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import qwen2
from mlx_lm.utils import load_model, load_tokenizer

from .config import ModelConfig
from .errors import CheckpointError
from .hub import local_or_download
from .projector import Projector
from .vision import VisionTower

# What a converted model directory needs from the hub: never pickles, never code.
MODEL_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.txt", "*.jinja",
               "vision_tower.mlpackage/*"]
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


class SFLLaVA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.projector = Projector(config.projector)
        self.language_model = qwen2.Model(qwen2.ModelArgs.from_dict(config.text_config))
        # LLaVA-OneVision / LLaVA-Video: a learned vector, placed by the recipe's newline rule
        self.image_newline = (mx.zeros((config.projector.hidden_size,))
                              if config.projector.image_newline else None)
        self.path: Optional[Path] = None  # the model directory it was loaded from
        self.identity: Optional[str] = None  # set where there is no directory (random weights)

    @property
    def newline(self):
        return self.image_newline

    def embed_tokens(self, ids) -> mx.array:
        return self.language_model.model.embed_tokens(mx.array(ids, dtype=mx.int32))

    def sanitize(self, weights: dict) -> dict:
        prefix = "language_model."
        llm = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        llm = self.language_model.sanitize(llm)
        rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        return {**rest, **{prefix + k: v for k, v in llm.items()}}

    @property
    def context_length(self) -> int:
        return self.config.text_config.get("max_position_embeddings", 32768)


def default_dtype() -> Optional[mx.Dtype]:
    # MLX's CPU backend has no fast half-precision path (SPEC §4).
    return mx.float32 if mx.default_device() == mx.cpu else None


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory, or a hub repo id downloaded (and cached) by huggingface-hub."""
    return local_or_download(str(path_or_repo), MODEL_FILES, "model")


def _classes(config: dict):
    return SFLLaVA, _Config


class _Config:
    """mlx-lm's ModelArgs role: config.json -> ModelConfig, refused when foreign."""

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        try:
            return ModelConfig.from_dict(d)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"config.json is not an sfllava model config: {e}") from None


def cast_model(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters (quantization scales too) to dtype; packed ints stay."""
    model.update(
        tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                 model.parameters())
    )


def load_sfllava(path_or_repo, dtype: Optional[mx.Dtype] = None, lazy: bool = False) -> SFLLaVA:
    """The converted model without its tokenizer (mlx-lm's loader with our classes)."""
    model_path = resolve_model_path(str(path_or_repo))
    ModelConfig.read(model_path)  # a missing or foreign config.json: one clear line
    try:
        model, _ = load_model(model_path, lazy=True, get_model_classes=_classes)
    except FileNotFoundError:
        raise CheckpointError(f"no model*.safetensors in {model_path}: not a converted model") from None
    except ValueError as e:
        raise CheckpointError(f"weights do not match config.json: {e}") from None
    except RuntimeError as e:  # a weight file that cannot be read
        raise CheckpointError(f"cannot read the weights in {model_path}: {e}") from None
    dtype = dtype or default_dtype()
    if dtype is not None:
        cast_model(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
    model.path = model_path
    return model


def load(path_or_repo, dtype: Optional[mx.Dtype] = None, lazy: bool = False):
    """Load a converted model: returns (SFLLaVA, mlx-lm TokenizerWrapper)."""
    model = load_sfllava(path_or_repo, dtype, lazy)
    tokenizer = quiet_load_tokenizer(model.path)
    for tok in END_TOKENS:
        if tok in tokenizer.get_vocab():
            tokenizer.add_eos_token(tok)
    return model, tokenizer


def quiet_load_tokenizer(model_path: Path):
    # transformers warns that model_type "sfllava" is unknown to it: true and harmless.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_tokenizer(model_path)
    finally:
        logging.set_verbosity(level)


def num_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
