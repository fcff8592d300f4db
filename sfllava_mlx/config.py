"""Configuration of a converted SF-LLaVA-1.5 model: one dataclass per concern.

Every numeric choice of SPEC §2 is a field here, read from the converted
model's config.json, so a checkpoint that differs needs a config change, not code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def _from_dict(cls, d: Optional[dict]):
    """Build a dataclass from a dict, ignoring keys it does not know."""
    d = d or {}
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27  # blocks in the source tower
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 16
    hidden_act: str = "gelu"  # "gelu" (exact) or "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    pos_grid: int = 128  # G0: the learned position table is G0 x G0
    pos_interpolation: str = "bilinear"  # "bilinear" (oryx-vit) or "bicubic" (siglip)
    # Hugging Face indexing resolved to >= 0: 0 = embeddings, k = output of block k.
    # Only blocks 0..k-1 are stored and run.
    feature_layer: int = 27

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class ProjectorConfig:
    projector_type: str = "mlp2x_gelu"
    input_size: int = 1152  # vision hidden size (mm_hidden_size)
    hidden_size: int = 1536  # LLM hidden size


@dataclass
class SamplingConfig:
    num_frames: int = 128
    slow_every: int = 4  # positions with i % slow_every == 0 form the slow stream
    slow_stride: int = 2
    fast_stride: int = 4


@dataclass
class PreprocessConfig:
    image_size: int = 384
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class PromptConfig:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    image_token: str = "<image>"


@dataclass
class ModelConfig:
    layout: str
    text_config: dict  # mlx_lm.models.qwen2.ModelArgs fields
    vision: VisionConfig
    projector: ProjectorConfig
    sampling: SamplingConfig
    preprocess: PreprocessConfig
    prompt: PromptConfig
    quantization: Optional[dict] = None  # mlx-lm's block: {"group_size", "bits"}
    dtype: str = "float32"
    source: dict = field(default_factory=dict)  # where the weights came from

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if d.get("model_type") != "sfllava":
            raise ValueError("config.json is not an sfllava model (model_type != 'sfllava')")
        return cls(
            layout=d["layout"],
            text_config=d["text_config"],
            vision=_from_dict(VisionConfig, d.get("vision_config")),
            projector=_from_dict(ProjectorConfig, d.get("projector_config")),
            sampling=_from_dict(SamplingConfig, d.get("sampling")),
            preprocess=_from_dict(PreprocessConfig, d.get("preprocess")),
            prompt=_from_dict(PromptConfig, d.get("prompt")),
            quantization=d.get("quantization"),
            dtype=d.get("dtype", "float32"),
            source=d.get("source", {}),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            "model_type": "sfllava",
            "layout": self.layout,
            "text_config": self.text_config,
            "vision_config": asdict(self.vision),
            "projector_config": asdict(self.projector),
            "sampling": asdict(self.sampling),
            "preprocess": asdict(self.preprocess),
            "prompt": asdict(self.prompt),
            "dtype": self.dtype,
            "source": self.source,
        }
        if self.quantization:
            d["quantization"] = self.quantization
            d["quantization_config"] = self.quantization  # as mlx-lm writes it
        return d

    @classmethod
    def load(cls, model_dir: Path) -> "ModelConfig":
        with open(Path(model_dir) / "config.json") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def read(cls, model_dir) -> "ModelConfig":
        """load(), with a missing or foreign config.json reported as the user's error."""
        from .errors import CheckpointError

        try:
            return cls.load(model_dir)
        except FileNotFoundError:
            raise CheckpointError(f"{model_dir} has no config.json: not a converted model") from None
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{model_dir}/config.json is not an sfllava model config: {e}") from None

    def save(self, model_dir: Path) -> None:
        with open(Path(model_dir) / "config.json", "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
