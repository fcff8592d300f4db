"""Configuration of a converted SF-LLaVA-1.5 model: one dataclass per concern.

Every numeric choice of design.md §1 is a field here, read from the converted
model's config.json, so a checkpoint that differs needs a config change, not code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from .files import write_atomic

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
VISION_BATCH = 8  # frames (or tiles) per tower call: bounds the working set whatever the count
# Prefill chunk. Where attention is not fused (MLX's CPU backend) each chunk materializes
# heads x chunk x context scores: 512 keeps that near 200 MB for 1.5B at 8K context.
PREFILL_STEP = 512
DECODE_CONCURRENCY = 8  # answers decoding together by default (mlx-lm's server: --decode-concurrency)


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
    image_newline: bool = False  # the checkpoint has a learned newline vector (D,)


FRAME_POSITIONS = ("midpoint", "linspace")
POOL_MODES = ("auto", "bilinear", "average")
NEWLINES = ("none", "one_token", "frame", "grid")
RECIPES = ("native", "slowfast")


@dataclass
class SamplingConfig:
    """A recipe (design.md §2.1): which frames a model sees and how they become tokens."""

    num_frames: int = 128
    frame_positions: str = "midpoint"  # midpoint: floor((i + 0.5) N / T); linspace: lmms-eval's
    slow_every: int = 4  # positions with i % slow_every == 0 form the slow stream
    slow_stride: int = 2
    fast_stride: int = 4
    pool_mode: str = "auto"  # auto: average, bilinear where the stride does not divide G
    newline: str = "none"  # where the learned image_newline goes in the token order

    def __post_init__(self):
        for name, allowed in (("frame_positions", FRAME_POSITIONS), ("pool_mode", POOL_MODES),
                              ("newline", NEWLINES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"sampling.{name} {getattr(self, name)!r} is not one of {allowed}")


# Each family's native frames (design.md §2.1): LLaVA-OneVision as transformers runs it, LLaVA-Video
# as its published evaluation runs (lmms-eval's linspace sampling, 32 / 64 frames).
NATIVE_FRAMES = {"llava-onevision": 32, "llava-video": 64}


def family_recipes(family: str, pool_mode: str = "auto", newline: str = "none",
                   stride: int = 2) -> dict:
    """{"native", "slowfast"} of a family; slowfast keeps the native pooling and newline,
    so on a public checkpoint it is SF-LLaVA's training-free SlowFast."""
    slowfast = SamplingConfig(pool_mode=pool_mode, newline=newline)
    if family not in NATIVE_FRAMES:  # SF-LLaVA-1.5: native is SlowFast
        return {"native": slowfast, "slowfast": replace(slowfast)}
    native = SamplingConfig(num_frames=NATIVE_FRAMES[family], frame_positions="linspace",
                            slow_every=1, slow_stride=stride, fast_stride=stride,
                            pool_mode=pool_mode, newline=newline)
    return {"native": native, "slowfast": slowfast}


@dataclass
class PreprocessConfig:
    image_size: int = 384
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])


# LLaVA-OneVision's any-resolution grid (transformers' LlavaOnevisionConfig default and the
# llava-hf / lmms-lab checkpoints): (height, width) in multiples of the 384 px tile, 1..6 each.
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


@dataclass
class ImageConfig:
    """How one picture becomes tokens (design.md §2.3), the `image` section of config.json.

    single: resized to S x S as a frame is (design.md §1.2), the tower's whole grid, no pooling,
    no newline. anyres_max_N (LLaVA-OneVision's anyres_max_9): a base image at S x S plus
    the tiles of the best `grid_pinpoints` resolution (Pillow resize with `resample`, zero
    padding), unpadded, bilinearly downsampled where the grid holds more than about N
    tiles' worth of tokens, an image newline after each row (transformers' exact rules).
    """

    mode: str = "single"
    grid_pinpoints: list = field(default_factory=list)  # [[height, width], ...] pixels (anyres)
    resample: str = "bicubic"  # Pillow filter of the anyres resizes
    image_mean: Optional[list] = None  # None: the preprocess section's (frames')
    image_std: Optional[list] = None

    def __post_init__(self):
        if self.mode != "single" and not (self.mode.startswith("anyres_max_")
                                          and self.mode[len("anyres_max_"):].isdigit()
                                          and int(self.mode[len("anyres_max_"):]) > 0):
            raise ValueError(f"image.mode {self.mode!r} is not 'single' or 'anyres_max_N'")
        if self.resample not in ("bicubic", "bilinear", "lanczos", "nearest"):
            raise ValueError(f"image.resample {self.resample!r} is not a Pillow filter name")
        self.grid_pinpoints = [[int(h), int(w)] for h, w in self.grid_pinpoints]
        if self.anyres and not self.grid_pinpoints:
            raise ValueError(f"image.mode {self.mode} needs image.grid_pinpoints")

    @property
    def anyres(self) -> bool:
        return self.mode != "single"

    @property
    def max_tiles(self) -> int:
        """N of anyres_max_N: the token budget of the tiles, in tiles."""
        return int(self.mode[len("anyres_max_"):]) if self.anyres else 1


@dataclass
class PromptConfig:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class ModelConfig:
    """The converted model. `recipes` holds the native and the training-free slowfast
    recipe (design.md §2.1); a Session picks one with `recipe()`, which never changes them."""

    layout: str
    text_config: dict  # mlx_lm.models.qwen2.ModelArgs fields
    vision: VisionConfig
    projector: ProjectorConfig
    recipes: dict  # name -> SamplingConfig: "native" and "slowfast"
    preprocess: PreprocessConfig
    prompt: PromptConfig
    quantization: Optional[dict] = None  # mlx-lm's block: {"group_size", "bits"}
    dtype: str = "float32"
    source: dict = field(default_factory=dict)  # where the weights came from
    family: str = "sf-llava-1.5"  # sf-llava-1.5 | llava-onevision | llava-video
    image: ImageConfig = field(default_factory=ImageConfig)  # pictures (design.md §2.3)

    def __post_init__(self):
        native = self.recipes["native"]
        self.recipes = {"native": native, "slowfast": native, **self.recipes}

    def recipe(self, name: str = "native", num_frames: Optional[int] = None) -> SamplingConfig:
        """A copy of recipe `name`, with `num_frames` in place of its T when given."""
        from .errors import UserError

        if name not in self.recipes:
            raise UserError(f"unknown recipe {name!r}: one of {', '.join(self.recipes)}")
        if num_frames is not None and num_frames < 1:
            raise UserError(f"--num-frames must be at least 1, not {num_frames}")
        return replace(self.recipes[name], **({} if num_frames is None else {"num_frames": num_frames}))

    def training_free(self, name: str) -> bool:
        """SlowFast on a model not trained with it (SF-LLaVA's original, training-free idea)."""
        return name == "slowfast" and self.recipes["slowfast"] != self.recipes["native"]

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if d.get("model_type") != "sfllava":
            raise ValueError("config.json is not an sfllava model (model_type != 'sfllava')")
        sampling = _from_dict(SamplingConfig, d.get("sampling"))
        recipes = {k: _from_dict(SamplingConfig, v) for k, v in (d.get("recipes") or {}).items()}
        return cls(
            layout=d["layout"],
            text_config=d["text_config"],
            vision=_from_dict(VisionConfig, d.get("vision_config")),
            projector=_from_dict(ProjectorConfig, d.get("projector_config")),
            recipes={"native": sampling, **recipes},
            preprocess=_from_dict(PreprocessConfig, d.get("preprocess")),
            prompt=_from_dict(PromptConfig, d.get("prompt")),
            quantization=d.get("quantization"),
            dtype=d.get("dtype", "float32"),
            source=d.get("source", {}),
            family=d.get("family", "sf-llava-1.5"),
            image=_from_dict(ImageConfig, d.get("image")),  # absent (older configs): single
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            "model_type": "sfllava",
            "family": self.family,
            "layout": self.layout,
            "text_config": self.text_config,
            "vision_config": asdict(self.vision),
            "projector_config": asdict(self.projector),
            "sampling": asdict(self.recipes["native"]),
            "recipes": {k: asdict(v) for k, v in self.recipes.items()},
            "preprocess": asdict(self.preprocess),
            "prompt": asdict(self.prompt),
            "image": asdict(self.image),
            "dtype": self.dtype,
            "source": self.source,
        }
        if self.quantization:
            d["quantization"] = self.quantization
            d["quantization_config"] = self.quantization  # as mlx-lm writes it
        return d

    @classmethod
    def read(cls, model_dir) -> ModelConfig:
        """config.json of a converted model; a missing or foreign one is the user's error."""
        from .errors import CheckpointError

        try:
            with open(Path(model_dir) / "config.json") as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise CheckpointError(f"{model_dir} has no config.json: not a converted model") from None
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{model_dir}/config.json is not an sfllava model config: {e}") from None

    def save(self, model_dir: Path) -> None:
        write_atomic(Path(model_dir) / "config.json", json.dumps(self.to_dict(), indent=2))
