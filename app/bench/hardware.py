"""The machine's physical limits, and the work each stage of the pipeline does.

Apple chips are detected and looked up in a table (sources in docs/hardware.md);
elsewhere the user passes the peak figures, or asks the bench to calibrate them. Work is
counted from the model's config: floating-point operations for the compute-bound stages
(vision tower, projector, prefill), bytes moved per token for the bandwidth-bound ones
(decode, a short follow-up question). Only matmuls and attention are counted: norms,
activations and softmax are a fraction of a percent at these sizes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

from sfllava_mlx.errors import UserError

# ---------------------------------------------------------------------------------------
# Apple silicon


@dataclass(frozen=True)
class Chip:
    name: str  # as `machdep.cpu.brand_string` names it, e.g. "Apple M2 Pro"
    bandwidth_gbs: float  # memory bandwidth, GB/s (10^9 bytes)
    fp16_tflops: float  # GPU FP16 TFLOPS at `gpu_cores`
    gpu_cores: Optional[int]  # the configuration the TFLOPS figure is for
    approximate: bool = False  # third-party figure, not measured (M3/M4 TFLOPS)


# docs/hardware.md gives the sources. Max chips come in two GPU sizes; where the memory
# bandwidth differs (M3 Max, M4 Max) both are listed, told apart by the GPU core count.
CHIPS = [
    Chip("Apple M1", 68, 2.6, 8),
    Chip("Apple M1 Pro", 200, 5.3, 16),
    Chip("Apple M1 Max", 400, 10.6, 32),
    Chip("Apple M1 Ultra", 800, 21.2, 64),
    Chip("Apple M2", 100, 3.6, 10),
    Chip("Apple M2 Pro", 200, 6.8, 19),
    Chip("Apple M2 Max", 400, 13.6, 38),
    Chip("Apple M2 Ultra", 800, 27.2, 76),
    Chip("Apple M3", 100, 4.1, 10, approximate=True),
    Chip("Apple M3 Pro", 150, 7.4, 18, approximate=True),
    Chip("Apple M3 Max", 300, 12.2, 30, approximate=True),  # 16.2 scaled by 30/40 cores
    Chip("Apple M3 Max", 400, 16.2, 40, approximate=True),
    Chip("Apple M4", 120, 4.6, 10, approximate=True),
    Chip("Apple M4 Pro", 273, 9.2, 20, approximate=True),
    Chip("Apple M4 Max", 410, 14.7, 32, approximate=True),  # 18.4 scaled by 32/40 cores
    Chip("Apple M4 Max", 546, 18.4, 40, approximate=True),
]


def lookup_chip(brand: str, gpu_cores: Optional[int] = None) -> Optional[Chip]:
    """The table's entry for a brand string (and GPU core count, when known).

    TFLOPS scale with the GPU cores when the machine has fewer than the table's
    configuration (e.g. a 14-core M1 Pro); bandwidth does not.
    """
    brand = " ".join(brand.split())
    matches = [c for c in CHIPS if c.name == brand]
    if not matches:
        return None
    if len(matches) > 1 and gpu_cores:  # two Max variants: the nearest core count
        matches.sort(key=lambda c: abs(c.gpu_cores - gpu_cores))
    elif len(matches) > 1:
        matches.sort(key=lambda c: -c.gpu_cores)  # unknown: assume the larger one
    chip = matches[0]
    if gpu_cores and chip.gpu_cores and gpu_cores != chip.gpu_cores:
        chip = Chip(chip.name, chip.bandwidth_gbs,
                    round(chip.fp16_tflops * gpu_cores / chip.gpu_cores, 1), gpu_cores,
                    approximate=True)
    return chip


def _command(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def gpu_core_count(profiler_text: str) -> Optional[int]:
    """`Total Number of Cores: 30` from `system_profiler SPDisplaysDataType`."""
    m = re.search(r"Total Number of Cores:\s*(\d+)", profiler_text)
    return int(m.group(1)) if m else None


def detect_chip() -> Optional[Chip]:
    """The Apple chip this runs on, or None (not a Mac, or a chip the table lacks)."""
    if sys.platform != "darwin":
        return None
    brand = _command(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    if not brand.startswith("Apple M"):
        return None
    cores = gpu_core_count(_command(["system_profiler", "SPDisplaysDataType"]))
    return lookup_chip(brand, cores)


# ---------------------------------------------------------------------------------------
# The peak a measurement is compared with


@dataclass
class Peak:
    tflops: Optional[float]  # dense matmul, at the compute dtype
    bandwidth_gbs: Optional[float]
    source: str  # where the figures come from, printed with the report

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_peak(tflops: Optional[float] = None, bandwidth_gbs: Optional[float] = None,
                 calibrate: bool = False, dtype=None) -> Peak:
    """User figures win; then a calibration if asked; then the detected chip's table row."""
    sources = []
    if tflops is not None or bandwidth_gbs is not None:
        sources.append("user (--peak-tflops/--peak-bandwidth-gbs)")
    if calibrate and (tflops is None or bandwidth_gbs is None):
        measured = measure_peak(dtype)
        tflops = tflops if tflops is not None else measured.tflops
        bandwidth_gbs = bandwidth_gbs if bandwidth_gbs is not None else measured.bandwidth_gbs
        sources.append(measured.source)
    if tflops is None or bandwidth_gbs is None:
        chip = detect_chip()
        if chip:
            tflops = tflops if tflops is not None else chip.fp16_tflops
            bandwidth_gbs = bandwidth_gbs if bandwidth_gbs is not None else chip.bandwidth_gbs
            sources.append(f"table: {chip.name} ({chip.gpu_cores}-core GPU"
                           f"{', TFLOPS approximate' if chip.approximate else ''})")
    if tflops is None and bandwidth_gbs is None:
        return Peak(None, None, "unknown: not an Apple chip in the table; pass --peak-tflops "
                                "and --peak-bandwidth-gbs, or --calibrate")
    return Peak(tflops, bandwidth_gbs, "; ".join(sources))


def _best_time(compute, *inputs, tries: int = 4) -> float:
    """Shortest of a few evaluations of compute(), its inputs evaluated beforehand."""
    import mlx.core as mx

    mx.eval(*inputs)
    best = float("inf")
    for _ in range(tries):
        tic = time.perf_counter()
        mx.eval(compute())
        best = min(best, time.perf_counter() - tic)
    return best


def measure_peak(dtype=None, size: int = 2048, bandwidth_mb: int = 512) -> Peak:
    """What MLX reaches on this machine: best of a few square matmuls, and the bytes a
    large float32 matrix-vector product reads per second. A best case for MLX here, not the
    silicon's spec."""
    import mlx.core as mx

    dtype = dtype or mx.float32
    a = mx.random.uniform(shape=(size, size)).astype(dtype)
    b = mx.random.uniform(shape=(size, size)).astype(dtype)
    tflops = 2 * size ** 3 / _best_time(lambda: a @ b, a, b) / 1e12
    # Bandwidth as decode uses it: a matrix-vector product streams the matrix once.
    rows = (bandwidth_mb << 20) // (4 * 4096)
    w = mx.random.uniform(shape=(rows, 4096))
    v = mx.random.uniform(shape=(4096,))
    bandwidth = w.nbytes / _best_time(lambda: w @ v, w, v) / 1e9
    return Peak(round(tflops, 3), round(bandwidth, 1),
                f"calibrated: MLX {size}^2 matmul and a {bandwidth_mb} MB matrix-vector product on "
                f"{mx.default_device()}")


# ---------------------------------------------------------------------------------------
# Work per stage (from the config, so a test can check it by hand)


def vision_flops_per_frame(vision) -> int:
    """Patch convolution + the blocks up to the feature layer, per frame.

    Per block on N tokens of width D, MLP width I: fused qkv 2·N·D·3D, QK^T 2·N²·D,
    attention·V 2·N²·D, output projection 2·N·D², MLP 2·2·N·D·I.
    """
    n, d, i = vision.num_patches, vision.hidden_size, vision.intermediate_size
    patch = 2 * n * (3 * vision.patch_size ** 2) * d
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * i
    return patch + vision.feature_layer * block


def projector_flops_per_frame(vision, projector) -> int:
    """mlp2x_gelu on the frame's N tokens (the whole grid: pooling comes after the projector):
    2·N·(Dv·D + D·D). Pooling is `pooling_flops`."""
    n = vision.num_patches
    return 2 * n * (projector.input_size * projector.hidden_size + projector.hidden_size ** 2)


def pooling_flops(vision, hidden_size: int, sampling) -> int:
    """The recipe's pooling of the projected (G, G, D) grids of all its frames.

    A bilinear resize to g = ceil(G/stride) is two matrix products per frame, g·G·G·D and
    then g·g·G·D multiply-adds; average pooling adds each of the G·G·D values once. Slow
    frames pool with the slow stride, fast frames with the fast one (design.md §1.5, §2.1)."""
    from sfllava_mlx.tokens import pooled_grid

    G, d = vision.grid, hidden_size
    n_slow = len(range(0, sampling.num_frames, sampling.slow_every))
    total = 0
    for frames, stride in ((n_slow, sampling.slow_stride),
                           (sampling.num_frames - n_slow, sampling.fast_stride)):
        g = pooled_grid(G, stride, sampling.pool_mode)
        if sampling.pool_mode == "bilinear" or (sampling.pool_mode == "auto" and G % stride):
            per_frame = 2 * g * G * G * d + 2 * g * g * G * d
        else:
            per_frame = G * G * d
        total += frames * per_frame
    return total


def _text(tc: dict):
    d, heads = tc["hidden_size"], tc["num_attention_heads"]
    head_dim = tc.get("head_dim") or d // heads
    return d, heads, tc["num_key_value_heads"], head_dim, tc["num_hidden_layers"]


def llm_matmul_params(tc: dict) -> int:
    """Non-embedding weight-matrix parameters of the Qwen2 layers (what a token multiplies)."""
    d, heads, kv_heads, hd, layers = _text(tc)
    attn = d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d
    mlp = 3 * d * tc["intermediate_size"]
    return layers * (attn + mlp)


def attention_flops(tc: dict, new_tokens: int, offset: int = 0) -> int:
    """QK^T and attention·V for `new_tokens` appended to `offset` cached ones: the token at
    position t attends to t+1 keys, each costing 2·2·heads·head_dim FLOP per layer."""
    d, heads, _, hd, layers = _text(tc)
    keys = new_tokens * offset + new_tokens * (new_tokens + 1) // 2
    return 4 * layers * heads * hd * keys


def prefill_flops(tc: dict, new_tokens: int, offset: int = 0) -> int:
    """2 × non-embedding parameters per token + attention + the one row of logits that
    gives the first token (mlx-lm does not evaluate the logits of the other tokens)."""
    return (2 * llm_matmul_params(tc) * new_tokens + attention_flops(tc, new_tokens, offset)
            + 2 * tc["hidden_size"] * tc["vocab_size"])


def kv_bytes_per_token(tc: dict, bytes_per_value: float) -> float:
    d, heads, kv_heads, hd, layers = _text(tc)
    return 2 * layers * kv_heads * hd * bytes_per_value


def decode_bytes_per_token(tc: dict, weight_bytes: int, kv_bytes_per_tok: float,
                           context: int, embedding_bytes: int = 0) -> float:
    """One decode step reads every LLM weight once, at its stored width (the tied embedding
    is read whole as the output layer), and the KV cache of the whole context. An untied
    input embedding is read one row at a time: pass its bytes to leave it out."""
    row = embedding_bytes / tc["vocab_size"] if embedding_bytes else 0
    return weight_bytes - embedding_bytes + row + kv_bytes_per_tok * context


def share(work: float, seconds: float, peak_per_second: Optional[float]) -> Optional[float]:
    """Fraction of the peak a stage reached: work / time / peak."""
    if not peak_per_second or not seconds or seconds <= 0:
        return None
    return work / seconds / peak_per_second


def require_positive(name: str, value: Optional[float]) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{name} must be positive, not {value}")
