"""Export the vision tower as a Core ML ML Program, for the Neural Engine (issue 6).

The tower is rebuilt as a torch module from the CONVERTED weights of the model
directory (so the package computes what the MLX tower computes), traced with
torch.jit.trace, and converted with coremltools at a fixed frame batch:

- input  `pixel_values` (B, S, S, 3) float32: channels-last, exactly the normalized
  frames the MLX tower takes, so the runtime hands them over without a transpose;
- output `features` (B, G*G, Dv) float16: the hidden state of `feature_layer`;
- float16 compute, minimum deployment target macOS 14 / iOS 17;
- the position table resized to G x G once, here, and baked in as a constant;
- user-defined metadata (`sfllava.*` keys): the source model, a fingerprint of the
  vision weights, the tower's config and the export settings; the runtime checks them
  (`sfllava_mlx.coreml_vision.check_package`) before it uses the package.

The projector and the SlowFast pooling stay in MLX. torch and coremltools are
imported only when an export runs: neither is needed to chat.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sfllava_mlx import __version__
from sfllava_mlx.config import ModelConfig, VisionConfig
from sfllava_mlx.coreml_vision import (
    INPUT_NAME,
    OUTPUT_NAME,
    PACKAGE_NAME,
    PREFIX,
    import_coremltools,
    vision_fingerprint,
)
from sfllava_mlx.errors import CheckpointError, UserError

# Frames per Core ML call. It divides the slow (32) and fast (96) streams, so no call
# is padded, and amortizes each call's weight traffic; `--batch-size` changes it.
DEFAULT_BATCH_SIZE = 8
TORCH_HINT = "pip install 'sfllava-mlx[torch]'"


def _import_torch():
    try:
        import torch
    except ImportError:
        raise UserError(f"Core ML export needs PyTorch, which is not installed: {TORCH_HINT}") from None
    return torch


def _import_coremltools():
    return import_coremltools("Core ML export")


def require() -> None:
    """Refuse, before any work, an export this installation cannot do."""
    _import_torch()
    _import_coremltools()


# --- the tower in torch: the same module tree and names as sfllava_mlx/vision.py ----


@functools.cache
def _torch_tower_class():
    """Define the torch classes on first use, so importing this module needs no torch."""
    torch = _import_torch()
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, dims: int, num_heads: int):
            super().__init__()
            self.num_heads = num_heads
            self.scale = (dims // num_heads) ** -0.5
            self.qkv = nn.Linear(dims, 3 * dims)
            self.proj = nn.Linear(dims, dims)

        def forward(self, x):
            B, L, D = x.shape
            # Split q, k, v on the feature axis and keep every tensor 4-D: the Neural
            # Engine handles rank <= 4 best.
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = (t.reshape(B, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            # Scale q before the product: keeps the float16 logits in range.
            attn = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(B, L, D))

    class MLP(nn.Module):
        def __init__(self, dims: int, hidden: int, act: str):
            super().__init__()
            self.fc1 = nn.Linear(dims, hidden)
            self.fc2 = nn.Linear(hidden, dims)
            self.act = nn.GELU(approximate="tanh" if act == "gelu_pytorch_tanh" else "none")

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, config: VisionConfig):
            super().__init__()
            d = config.hidden_size
            self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.attn = Attention(d, config.num_attention_heads)
            self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
            self.mlp = MLP(d, config.intermediate_size, config.hidden_act)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TorchVisionTower(nn.Module):
        """(B, S, S, 3) channels-last frames -> (B, G*G, Dv) features."""

        def __init__(self, config: VisionConfig):
            super().__init__()
            d, p, g = config.hidden_size, config.patch_size, config.grid
            self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
            # Already resized to the frame grid: a constant of the traced graph.
            self.register_buffer("pos_embed", torch.zeros(g * g, d))
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.feature_layer))

        def forward(self, pixels):
            x = self.patch_embed(pixels.permute(0, 3, 1, 2))  # NHWC -> NCHW for the conv
            x = x.flatten(2).transpose(1, 2) + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return x

    return TorchVisionTower


def resize_position_table(table: np.ndarray, config: VisionConfig) -> np.ndarray:
    """(G0*G0, Dv) learned table -> (G*G, Dv) with F.interpolate, as design.md §1.3 says."""
    torch = _import_torch()
    g0, g = config.pos_grid, config.grid
    if g0 == g:
        return table
    t = torch.from_numpy(table).reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
    t = torch.nn.functional.interpolate(t, size=(g, g), mode=config.pos_interpolation,
                                        align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(g * g, -1).numpy()


def read_vision_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The tower's tensors of a converted model as float32 numpy, names without the prefix."""
    import mlx.core as mx

    prefix = "vision_tower."
    files = sorted(Path(model_dir).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors in {model_dir}: not a converted model")
    weights = {}
    for f in files:
        for name, value in mx.load(str(f)).items():
            if name.startswith(prefix):
                weights[name[len(prefix):]] = np.array(value.astype(mx.float32))
    if any(name.endswith(".scales") for name in weights):
        raise CheckpointError("the vision tower of this model is quantized: "
                              "Core ML export needs float weights")
    return weights


def build_torch_tower(config: VisionConfig, weights: dict[str, np.ndarray]):
    """The torch twin of `sfllava_mlx.vision.VisionTower`, loaded with the converted weights."""
    torch = _import_torch()
    tower = _torch_tower_class()(config)
    if "patch_embed.weight" not in weights or "pos_embed" not in weights:
        raise CheckpointError("the model has no vision tower weights "
                              "(vision_tower.patch_embed, vision_tower.pos_embed)")
    state = dict(weights)
    # MLX conv layout (O, H, W, I) -> torch's (O, I, H, W)
    state["patch_embed.weight"] = weights["patch_embed.weight"].transpose(0, 3, 1, 2)
    state["pos_embed"] = resize_position_table(weights["pos_embed"], config)
    try:
        tower.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    except RuntimeError as e:
        raise CheckpointError(f"vision weights do not match config.json: {e}") from None
    return tower.eval()


def trace_tower(tower, config: VisionConfig):
    """TorchScript of the tower. Traced on one frame (tracing runs the tower once): the
    graph reads the batch from its input, and the converter fixes it from the input shape."""
    torch = _import_torch()
    s = config.image_size
    example = torch.zeros(1, s, s, 3)
    # coremltools converts TorchScript; torch >= 2.9 calls jit.trace deprecated, not gone.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(tower, example)


def package_metadata(model_dir: Path, config: ModelConfig, batch_size: int) -> dict[str, str]:
    """What the runtime checks before it uses the package (strings: Core ML's format)."""
    v = config.vision
    return {
        f"{PREFIX}source": json.dumps(config.source, sort_keys=True),
        f"{PREFIX}fingerprint": vision_fingerprint(model_dir),
        f"{PREFIX}vision_config": json.dumps(asdict(v), sort_keys=True),
        f"{PREFIX}feature_layer": str(v.feature_layer),
        f"{PREFIX}batch_size": str(batch_size),
        f"{PREFIX}image_size": str(v.image_size),
        f"{PREFIX}hidden_size": str(v.hidden_size),
        f"{PREFIX}num_patches": str(v.num_patches),
        f"{PREFIX}compute_precision": "float16",
        f"{PREFIX}input_layout": "NHWC",
        f"{PREFIX}version": __version__,
    }


def convert_traced(traced, config: VisionConfig, batch_size: int, metadata: dict[str, str]):
    """The traced tower -> an ML Program with float16 compute."""
    ct = _import_coremltools()
    s = config.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=(batch_size, s, s, 3), dtype=np.float32)],
            outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float16)],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.macOS14,
            skip_model_load=True,  # nothing to load on Linux; the runtime loads it on a Mac
        )
    mlmodel.short_description = (f"SF-LLaVA vision tower: {batch_size} frames of {s}x{s} -> "
                                 f"features of layer {config.feature_layer}")
    mlmodel.version = __version__
    mlmodel.user_defined_metadata.update(metadata)
    return mlmodel


def export(model_dir, batch_size: int = DEFAULT_BATCH_SIZE, force: bool = False, log=None) -> Path:
    """Write `<model_dir>/vision_tower.mlpackage` for a converted model; returns its path."""
    model_dir = Path(model_dir)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    config = ModelConfig.read(model_dir)
    target = model_dir / PACKAGE_NAME
    if target.exists() and not force:
        raise UserError(f"{target} exists: pass --force to replace it")
    require()  # fail before any work
    log = log or (lambda msg: None)

    log(f"Rebuilding the vision tower ({config.vision.feature_layer} blocks) in torch")
    tower = build_torch_tower(config.vision, read_vision_weights(model_dir))
    log("Tracing it")
    traced = trace_tower(tower, config.vision)
    log("Converting to a Core ML ML Program (float16 compute)")
    metadata = package_metadata(model_dir, config, batch_size)
    mlmodel = convert_traced(traced, config.vision, batch_size, metadata)

    # Write beside the target, then swap it in: never a half-written package.
    tmp = Path(tempfile.mkdtemp(prefix=".vision_tower-", dir=model_dir))
    try:
        mlmodel.save(str(tmp / PACKAGE_NAME))
        if target.exists():
            target.rename(tmp / "replaced.mlpackage")  # removed with tmp
        (tmp / PACKAGE_NAME).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Wrote {target}")
    return target
