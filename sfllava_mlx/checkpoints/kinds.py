"""What a model directory is (design.md §5.4), told from its config.json and its weight files:
a directory `sfllava convert` wrote, an mlx-vlm conversion (loaded as it is), or a Hugging
Face checkpoint in a layout of §3 (converted on first use). Anything else is refused in one
line that says what it is or what it lacks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..errors import CheckpointError
from . import layouts
from .source import PICKLE_SUFFIXES, open_checkpoint

SFLLAVA, MLX_VLM, HUGGING_FACE = "sfllava", "mlx-vlm", "Hugging Face"
# model_type -> the families of that type that run here
FAMILIES = {
    "sfllava": "sfllava conversions",
    "llava_onevision": "LLaVA-OneVision / LLaVA-Video (llava-hf, mlx-vlm)",
    "llava": "SF-LLaVA-1.5 / LLaVA-OneVision / LLaVA-Video (LLaVA-NeXT code base)",
    "llava_qwen": "LLaVA-OneVision / LLaVA-Video (LLaVA-NeXT code base)",
}
MLX_VLM_TYPES = ("llava_onevision",)  # what mlx-vlm writes of those families


@dataclass
class Checkpoint:
    """A model directory, told apart: its kind and config.json."""

    path: Path
    kind: str  # SFLLAVA | MLX_VLM | HUGGING_FACE
    config: dict

    @property
    def quantization(self) -> Optional[dict]:
        return self.config.get("quantization")

    def model_config(self) -> ModelConfig:
        """Our ModelConfig: read (sfllava), or mapped as `convert` maps llava-hf (the rest)."""
        if self.kind == SFLLAVA:
            return ModelConfig.read(self.path)
        src = open_checkpoint(self.path)
        layout = layouts.detect_layout(src.tensors)
        aliases = layouts.canonical_names(layout, src.tensors)
        shapes = {n: src.tensors[real].shape for n, real in aliases.items()}
        cfg = layouts.model_config(layout, src.config, shapes, src.preprocessor,
                                   image_preprocessor=src.image_preprocessor)
        cfg.quantization = self.quantization
        cfg.dtype = src.dtype
        cfg.source = {**cfg.source, "format": self.kind, "path": str(self.path)}
        return cfg


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is not a model directory: it has no config.json (an sfllava or mlx-vlm "
            "conversion, or a Hugging Face checkpoint, has one)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise CheckpointError(f"{path}/config.json names no model_type: not a model's config")
    return config


def _stored_by_mlx(path: Path) -> bool:
    """MLX's writer (mlx-lm, mlx-vlm) marks its safetensors files {"format": "mlx"}."""
    from safetensors import safe_open

    first = min(path.glob("*.safetensors"))
    with safe_open(str(first), framework="numpy") as f:
        return (f.metadata() or {}).get("format") == "mlx"


def identify(path) -> Checkpoint:
    """The kind of the model directory at `path`; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model not found: {path} is not a directory")
    config = _read_config(path)
    model_type = config["model_type"]
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{path} holds a {model_type!r} model, a family that does not run here; "
            f"these do: {'; '.join(f'{k} ({v})' for k, v in FAMILIES.items())}")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise CheckpointError(
            f"{path} has no *.safetensors weights" + (
                f" (only PyTorch pickles, {', '.join(sorted(pickles)[:3])}: "
                "`sfllava convert --allow-pickle` reads them)" if pickles else ""))
    if model_type == "sfllava":
        return Checkpoint(path, SFLLAVA, config)
    if model_type in MLX_VLM_TYPES and (config.get("quantization") or _stored_by_mlx(path)):
        return Checkpoint(path, MLX_VLM, config)
    return Checkpoint(path, HUGGING_FACE, config)


def check_quantization(q: Optional[dict]) -> None:
    """A quantization this MLX cannot run is refused in one line (tried on a small array)."""
    if not q:
        return
    import mlx.core as mx

    mode, bits, group = q.get("mode", "affine"), q.get("bits"), q.get("group_size")
    try:
        w = mx.quantize(mx.zeros((2, 2 * int(group))), group_size=group, bits=bits, mode=mode)
        mx.eval(mx.quantized_matmul(mx.zeros((1, 2 * int(group))), *w[:2],
                                    w[2] if len(w) > 2 else None, transpose=True,
                                    group_size=group, bits=bits, mode=mode))
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"its quantization ({mode}, {bits}-bit, group {group}) cannot run with MLX "
            f"{mx.__version__} here: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
