"""The vision tower through Core ML (`--vision-backend coreml`), macOS only.

`sfllava export-coreml` (convert/coreml.py) writes `vision_tower.mlpackage` into the
model directory; `CoreMLVisionTower` runs it on the Neural Engine (or GPU) and stands in
for `model.vision_tower`: (B, S, S, 3) normalized frames -> (B, G*G, Dv) features. The
projector and pooling stay in MLX.

`prefill_while_encoding` is the slow-first schedule: a worker thread encodes the slow
frames, then the fast ones, while this thread prefills the LLM with what is ready, so
the Neural Engine and the GPU work at the same time; `overlapped_prefill` applies it to
a model and a KV cache (what `Conversation.prefill_prefix` does, slow first).

coremltools is imported inside functions only: on Linux its import prints warnings.
"""

from __future__ import annotations

import collections
import hashlib
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, UserError

PACKAGE_NAME = "vision_tower.mlpackage"
INPUT_NAME = "pixel_values"  # (B, S, S, 3) float32, channels-last like the MLX tower's input
OUTPUT_NAME = "features"  # (B, G*G, Dv) float16
PREFIX = "sfllava."  # of the package's user-defined metadata keys
COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")
BACKENDS = ("mlx", "coreml")


def _export_hint(model_dir, force: bool = False) -> str:
    return f"run `sfllava export-coreml --model {model_dir}{' --force' if force else ''}`"


def available_backends() -> tuple[str, ...]:
    """Vision backends this machine can run: Core ML predictions need macOS."""
    return BACKENDS if sys.platform == "darwin" else ("mlx",)


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


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, {name: {dtype, shape, data_offsets}}) without reading tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def vision_fingerprint(model_dir) -> str:
    """A digest of the converted vision weights that costs milliseconds, not a full read.

    It covers every vision tensor's name, dtype and shape, and the bytes of the 1-D ones
    (biases and norms: a few hundred thousand values, different for any other weights).
    """
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("model*.safetensors")):
        base, header = _safetensors_header(path)
        with open(path, "rb") as f:
            for name in sorted(k for k in header if k.startswith("vision_tower.")):
                entry = header[name]
                h.update(f"{name}:{entry['dtype']}:{entry['shape']};".encode())
                if len(entry["shape"]) == 1:
                    begin, end = entry["data_offsets"]
                    f.seek(base + begin)
                    h.update(f.read(end - begin))
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
    def for_model(cls, model, compute_units: str = "ALL") -> "CoreMLVisionTower":
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


# --- slow first: the Neural Engine encodes while the GPU prefills ------------------------


@dataclass
class Timeline:
    """Busy intervals (perf_counter seconds) of the vision backend and of the prefill."""

    start: float
    vision: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    end: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def vision_s(self) -> float:
        return sum(e - s for s, e in self.vision)

    @property
    def prefill_s(self) -> float:
        return sum(e - s for s, e in self.prefill)

    @property
    def overlap_s(self) -> float:
        """Time both units were busy at once."""
        return overlap_seconds(self.vision, self.prefill)

    def critical_path(self) -> dict:
        """SPEC §4 stage shares: prefill ran on this thread, so all of it is on the
        critical path; vision counts only the time this thread waited for the encoder."""
        return {"vision": max(0.0, self.wall_s - self.prefill_s), "prefill": self.prefill_s}


def overlap_seconds(a: list, b: list) -> float:
    """Total length of the intersection of two lists of disjoint (start, end) intervals."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def prefill_while_encoding(
    encode: Callable[[np.ndarray], np.ndarray],
    slow: np.ndarray,
    fast: np.ndarray,
    prefill: Callable,
    batch_size: int,
) -> Timeline:
    """Encode the slow frames, then the fast ones, in a worker thread, and prefill here.

    `encode` maps (n, S, S, 3) numpy pixels to (n, G*G, Dv) numpy features; it gets at
    most `batch_size` frames a call, slow frames first, and must not touch MLX.
    `prefill(features: mx.array, stream)` runs on this thread in token order: once with
    all the slow features (`stream="slow"`), then with the fast features in frame order,
    as many frames at a time as are ready (`stream="fast"`). It projects, pools and runs
    the LLM on them while the worker encodes the next frames.
    """
    import mlx.core as mx

    timeline = Timeline(start=time.perf_counter())
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    batches = [("slow", slow[i:i + batch_size]) for i in range(0, len(slow), batch_size)]
    batches += [("fast", fast[i:i + batch_size]) for i in range(0, len(fast), batch_size)]

    def worker():
        try:
            for stream, pixels in batches:
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                features = encode(pixels)
                timeline.vision.append((t0, time.perf_counter()))
                ready.put((stream, features))
        except BaseException as e:  # re-raised on the caller's thread
            ready.put(("error", e))

    def run_prefill(features: list, stream: str):
        t0 = time.perf_counter()
        prefill(mx.array(np.concatenate(features)), stream)
        timeline.prefill.append((t0, time.perf_counter()))

    def take() -> tuple:
        stream, item = ready.get()
        if stream == "error":
            raise item
        return stream, item

    thread = threading.Thread(target=worker, name="sfllava-coreml-vision", daemon=True)
    thread.start()
    try:
        remaining = len(batches)
        slow_features = []
        for _ in range(sum(1 for s, _ in batches if s == "slow")):
            slow_features.append(take()[1])
            remaining -= 1
        if slow_features:
            run_prefill(slow_features, "slow")
        while remaining:
            fast_features = [take()[1]]  # wait for one batch, then take all that are ready
            while len(fast_features) < remaining and not ready.empty():
                fast_features.append(take()[1])
            remaining -= len(fast_features)
            run_prefill(fast_features, "fast")
    finally:
        stop.set()
        thread.join()
    timeline.end = time.perf_counter()
    return timeline



def overlapped_prefill(model, cache: list, prefix_ids: list, images: list,
                       encode: Callable[[np.ndarray], np.ndarray], batch_size: int, *,
                       prefill_step_size: int = 2048, kv_options: Optional[dict] = None,
                       sampling=None):
    """Prefill the prompt's text before `<image>` and the video into `cache`, slow first,
    while `encode` (e.g. `CoreMLVisionTower.encode`) works in a worker thread.

    `images` are the sampled RGB frames in position order (`SampledFrames.images`).
    Leaves `cache` as `Conversation.prefill_prefix` would, and returns the visual tokens
    (slow block then fast block, as `encode_video` makes them) and the Timeline.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from .pooling import concat_streams, is_slow, pool_frames, stride_of, with_newlines
    from .preprocess import preprocess

    cfg = model.config
    sampling = sampling or cfg.sampling
    g = cfg.vision.grid
    lm = model.language_model
    feature_dtype = model.projector.linear_1.weight.dtype
    embed_dtype = lm.model.norm.weight.dtype

    def pixels(slow: bool) -> np.ndarray:
        chosen = [im for p, im in enumerate(images) if is_slow(p, sampling) == slow]
        if not chosen:
            return np.zeros((0, cfg.vision.image_size, cfg.vision.image_size, 3), np.float32)
        return np.asarray(preprocess(chosen, cfg.preprocess))

    pooled = {"slow": [], "fast": []}
    text = [model.embed_tokens(prefix_ids).astype(embed_dtype)]  # goes in with the slow block

    def run(embeds):
        placeholder = mx.zeros((embeds.shape[0],), dtype=mx.int32)
        for _ in generate_step(placeholder, lm, max_tokens=0, prompt_cache=cache,
                               input_embeddings=embeds, prefill_step_size=prefill_step_size,
                               **(kv_options or {})):
            pass

    def prefill(features, stream: str):
        grid = model.projector(features.astype(feature_dtype)).reshape(features.shape[0], g, g, -1)
        tokens = pool_frames(grid, stride_of(stream == "slow", sampling), sampling.pool_mode)
        pooled[stream].append(tokens)
        # Row and frame newlines belong to each frame, so a chunk carries its own.
        chunk = with_newlines(tokens, sampling, model.newline).astype(embed_dtype)
        run(mx.concatenate(text + [chunk]))
        text.clear()
        mx.eval([c.state for c in cache] + pooled[stream][-1:])

    # Position 0 is always slow, so the first prefill call carries the text.
    timeline = prefill_while_encoding(encode, pixels(True), pixels(False), prefill, batch_size)
    if sampling.newline == "one_token":  # after the whole video
        run(model.newline.astype(embed_dtype)[None])
        mx.eval([c.state for c in cache])
    tokens = concat_streams(mx.concatenate(pooled["slow"]) if pooled["slow"] else None,
                            mx.concatenate(pooled["fast"]) if pooled["fast"] else None,
                            sampling=sampling, newline=model.newline)
    return tokens, timeline
