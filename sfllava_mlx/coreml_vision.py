"""The vision tower through Core ML (`--vision-backend coreml`), macOS only.

`sfllava export-coreml` (convert/coreml.py) writes `vision_tower.mlpackage` into the
model directory; `CoreMLVisionTower` runs it on the Neural Engine (or GPU) and stands in
for `model.vision_tower`: (B, S, S, 3) normalized frames -> (B, G*G, Dv) features. The
projector and pooling stay in MLX; `overlap.py` runs the tower beside the prefill.

coremltools is imported inside functions only: on Linux its import prints warnings.
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, UserError
from .options import COMPUTE_UNITS

PACKAGE_NAME = "vision_tower.mlpackage"
INPUT_NAME = "pixel_values"  # (B, S, S, 3) float32, channels-last like the MLX tower's input
OUTPUT_NAME = "features"  # (B, G*G, Dv) float16
PREFIX = "sfllava."  # of the package's user-defined metadata keys


def _export_hint(model_dir, force: bool = False) -> str:
    return f"run `sfllava export-coreml --model {model_dir}{' --force' if force else ''}`"





def require_macos() -> None:
    if sys.platform != "darwin":
        raise UserError("--vision-backend coreml needs macOS: Core ML cannot run predictions on Linux")


def import_coremltools(purpose: str = "--vision-backend coreml"):
    """coremltools, quietly: its import logs warnings about its own build on Linux and
    about untested torch versions, none of which concern a user of this package."""
    import logging
    import warnings

    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError:
        raise UserError(f"{purpose} needs coremltools: pip install coremltools") from None
    finally:
        log.setLevel(level)
    return ct


# --- which model a package was made for --------------------------------------------


def vision_fingerprint(model_dir) -> str:
    """A digest of the converted vision weights that costs milliseconds, not a full read.

    It covers every vision tensor's name, dtype and shape, and the bytes of the 1-D ones
    (biases and norms: a few hundred thousand values, different for any other weights).
    """
    import mlx.core as mx
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        arrays = mx.load(str(path))  # lazy: only the 1-D tensors below are read
        with safe_open(str(path), framework="numpy") as f:
            for name in sorted(k for k in f.keys() if k.startswith("vision_tower.")):
                entry = f.get_slice(name)
                shape = entry.get_shape()
                h.update(f"{name}:{entry.get_dtype()}:{shape};".encode())
                if len(shape) == 1:
                    h.update(bytes(memoryview(arrays[name].view(mx.uint8))))
    return h.hexdigest()[:32]


def read_package_metadata(package: Path) -> dict[str, str]:
    """The package's user-defined metadata, read from its spec (works on Linux too)."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(package))
    return dict(spec.description.metadata.userDefined)


def check_package(model_dir, config: ModelConfig) -> dict[str, str]:
    """Raise a one-line error unless `<model_dir>/vision_tower.mlpackage` was made for it."""
    model_dir = Path(model_dir)
    package = model_dir / PACKAGE_NAME
    if not package.exists():
        raise UserError(f"no Core ML vision tower in {model_dir}: {_export_hint(model_dir)}")
    try:
        meta = read_package_metadata(package)
    except UserError:
        raise
    except Exception as e:
        hint = _export_hint(model_dir, force=True)
        raise CheckpointError(f"cannot read {package}: {e}; {hint}") from None
    expected = {
        "fingerprint": vision_fingerprint(model_dir),
        "vision_config": json.dumps(asdict(config.vision), sort_keys=True),
    }
    differs = [k for k, v in expected.items() if meta.get(PREFIX + k) != v]
    if differs:
        raise CheckpointError(
            f"{package} was made for another model: {_export_hint(model_dir, force=True)}",
            details=f"differs: {', '.join(differs)}",
        )
    return meta


# --- the runtime backend --------------------------------------------------------------


class CoreMLVisionTower:
    """The exported tower as a drop-in for `model.vision_tower` (macOS only)."""

    def __init__(self, model_dir, config: ModelConfig, compute_units: str = "ALL", dtype=None):
        require_macos()
        if compute_units not in COMPUTE_UNITS:
            raise UserError(f"unknown compute units {compute_units!r}: "
                            f"choose one of {', '.join(COMPUTE_UNITS)}")
        meta = check_package(model_dir, config)
        ct = import_coremltools()
        self.batch_size = int(meta[PREFIX + "batch_size"])
        self.compute_units = compute_units
        self.dtype = dtype  # of the features handed to MLX; None keeps the package's float16
        # Core ML may release a prediction's input on its own queue about a second later;
        # if that drops the last reference to the numpy array, Python's heap is touched
        # without the GIL (coremltools PR #2827). Recent inputs stay referenced here.
        self._recent_inputs = collections.deque(maxlen=4)
        # Loading compiles the program for the chosen units (seconds, once per process).
        self.mlmodel = ct.models.MLModel(
            str(Path(model_dir) / PACKAGE_NAME), compute_units=getattr(ct.ComputeUnit, compute_units)
        )

    @classmethod
    def for_model(cls, model, compute_units: str = "ALL") -> CoreMLVisionTower:
        """For a loaded SFLLaVA: features come back in its projector's dtype."""
        return cls(model.path, model.config, compute_units, dtype=model.projector.linear_1.weight.dtype)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 numpy -> (N, G*G, Dv) float16 numpy; touches no MLX state,
        so a worker thread may call it."""
        b, out = self.batch_size, []
        for start in range(0, len(pixels), b):
            chunk = np.ascontiguousarray(pixels[start:start + b], dtype=np.float32)
            n = len(chunk)
            if n < b:  # the package's batch is fixed: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), np.float32)])
            self._recent_inputs.append(chunk)
            out.append(self.mlmodel.predict({INPUT_NAME: chunk})[OUTPUT_NAME][:n])
        return np.concatenate(out)

    def __call__(self, pixels):
        import mlx.core as mx

        features = mx.array(self.encode(np.asarray(pixels.astype(mx.float32))))
        return features if self.dtype is None else features.astype(self.dtype)
