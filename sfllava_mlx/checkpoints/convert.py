"""Convert a Hugging Face checkpoint (design.md §5.2) to an MLX model directory: `sfllava convert`
and the first use of a checkpoint (design.md §5.4) both run this.

    map names -> check every shape -> cast -> load into SFLLaVA (strict) ->
    quantize the LLM (optional) -> write to a temporary directory -> rename

Nothing is written at DST unless the whole conversion succeeds.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import CheckpointError, UserError
from . import layouts
from .source import AUX_FILES, check_tokenizer, open_checkpoint, tokenizer_size

DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ConversionReport:
    layout: str
    source: str
    output: Path
    dtype: str
    source_dtype: str
    parameters: int
    quantization: Optional[dict]
    bytes_on_disk: int
    feature_layer: int
    vision_blocks: int
    dropped: dict = field(default_factory=dict)  # source name -> reason
    seconds: float = 0.0


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sfllava-mlx")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def default_dtype(source_dtype: str) -> str:
    # MLX's CPU backend has no fast half-precision path (design.md §3).
    if mx.default_device() == mx.cpu:
        return "float32"
    return source_dtype if source_dtype in DTYPES else "float32"


def _param_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _build_weights(src, p: layouts.TensorMap, dtype: mx.Dtype) -> dict:
    """The MLX weights, lazily: nothing is read until the writer evaluates it."""
    out = {}
    for rule in p.rules:
        arrays = [src.load(s) for s in rule.sources]
        out[rule.target] = layouts.transform(rule.kind, arrays).astype(dtype)
    return out


def _language_model_only(path: str, module) -> bool:
    return path.startswith("language_model")  # the vision tower and projector stay float


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_destination(dst: Path, force: bool, src: Optional[Path] = None) -> None:
    if src is not None and src.exists() and dst.resolve() == src.resolve():
        raise UserError(f"--mlx-path {dst} is the source checkpoint; choose another directory")
    if dst.exists() and not force:
        raise UserError(f"{dst} already exists; pass --force to replace it")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a directory")


def prepare_conversion(hf_path: str, allow_pickle: bool = False):
    """Read and check everything, convert nothing: (source, model config, tensor map, empty model)."""
    from ..architecture import SFLLaVA  # the runtime model defines every expected shape
    from .fetch import resolve_source

    src = open_checkpoint(resolve_source(hf_path, allow_pickle=allow_pickle), allow_pickle=allow_pickle)
    check_tokenizer(src.path)
    layout = layouts.detect_layout(src.tensors)
    aliases = layouts.canonical_names(layout, src.tensors)
    shapes = {n: src.tensors[real].shape for n, real in aliases.items()}
    cfg = layouts.model_config(layout, src.config, shapes, src.preprocessor,
                               image_preprocessor=src.image_preprocessor)
    n_tok = tokenizer_size(src.path)
    if n_tok is not None and n_tok > cfg.text_config["vocab_size"]:
        raise CheckpointError(
            f"the tokenizer has {n_tok} tokens but the LLM only {cfg.text_config['vocab_size']} "
            "embeddings (vocab_size)")
    model = SFLLaVA(cfg)  # parameters stay lazy: only their shapes are read here
    p = layouts.map_tensors(layout, shapes, cfg, _param_shapes(model), aliases)
    if not p.ok:
        raise CheckpointError(layouts.summary_line(p), details=layouts.report(
            p, {n: t.shape for n, t in src.tensors.items()}))
    return src, cfg, p, model


def convert(
    hf_path: str,
    mlx_path: str,
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    allow_pickle: bool = False,
) -> ConversionReport:
    start = time.perf_counter()
    dst = Path(mlx_path).expanduser()
    check_destination(dst, force, Path(hf_path).expanduser())
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
    if quantize and q_bits not in (2, 3, 4, 5, 6, 8):
        raise UserError(f"--q-bits {q_bits} is not supported (4 or 8)")

    src, cfg, p, model = prepare_conversion(hf_path, allow_pickle)
    out_dtype = dtype or default_dtype(src.dtype)
    model.load_weights(list(_build_weights(src, p, getattr(mx, out_dtype)).items()), strict=True)
    # The model's lazy weights hold what they need of each source file: dropping the reader's
    # own references lets a file's tensors go once written (7B: 5.6 GiB peak, not the source's 16).
    src.release()
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    if quantize:
        from mlx_lm.utils import quantize_model

        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints an [INFO] line
            model, config = quantize_model(model, cfg.to_dict(), q_group_size, q_bits,
                                           quant_predicate=_language_model_only)
        cfg.quantization = config["quantization"]
    cfg.dtype = out_dtype
    cfg.source.update({"hf_path": str(hf_path), "dtype": src.dtype, "format": src.format,
                       "converter": f"sfllava {version()}"})

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model directory is not
    try:
        _write(model, cfg, src.path, tmp)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return ConversionReport(
        layout=cfg.layout, source=str(hf_path), output=dst, dtype=out_dtype, source_dtype=src.dtype,
        parameters=parameters, quantization=cfg.quantization, bytes_on_disk=_dir_size(dst),
        feature_layer=cfg.vision.feature_layer, vision_blocks=cfg.vision.num_hidden_layers,
        dropped=p.dropped, seconds=time.perf_counter() - start)


def _write(model, cfg, src_path: Path, out: Path) -> None:
    from mlx_lm.utils import save_model

    try:
        save_model(out, model, donate_model=True)
    except (ValueError, RuntimeError) as e:  # a tensor that cannot be read
        raise CheckpointError(f"cannot read the checkpoint's weights: {e}") from None
    cfg.save(out)
    for name in AUX_FILES:
        if name != "config.json" and (src_path / name).exists():
            shutil.copy2(src_path / name, out / name)


def _replace(tmp: Path, dst: Path) -> None:
    """Rename tmp to dst; an existing dst (--force) is removed only after that succeeds."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)
