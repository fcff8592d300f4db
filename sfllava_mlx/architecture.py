"""The SF-LLaVA-1.5 model: vision tower, projector and a Qwen2 LLM from mlx-lm."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import qwen2

from .checkpoints.layouts import STORED_HF_MARKERS, stored_hf_weights
from .config import ModelConfig
from .projector import Projector
from .vision import VisionTower


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
        # mlx-vlm's files keep the llava-hf names: mapped through the converter's table
        if any(k.startswith(STORED_HF_MARKERS) for k in weights):
            weights = stored_hf_weights(weights, self.config,
                                        [k for k, _ in tree_flatten(self.parameters())])
        prefix = "language_model."
        llm = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        llm = self.language_model.sanitize(llm)
        rest = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        return {**rest, **{prefix + k: v for k, v in llm.items()}}

    @property
    def context_length(self) -> int:
        return self.config.text_config.get("max_position_embeddings", 32768)


def default_dtype() -> Optional[mx.Dtype]:
    # MLX's CPU backend has no fast half-precision path (design.md §3).
    return mx.float32 if mx.default_device() == mx.cpu else None


def cast_model(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters (quantization scales too) to dtype; packed ints stay."""
    model.update(
        tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                 model.parameters())
    )


def num_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))
