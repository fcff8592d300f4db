"""Loading a model (design.md §5.4): a directory `sfllava convert` wrote, an mlx-vlm conversion
(loaded as it is), or a Hugging Face checkpoint (converted on first use), from a path or
a hub repo id. The kind is told from config.json; anything else is refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx_lm.utils import load_model, load_tokenizer

from .architecture import SFLLaVA, cast_model, default_dtype, num_parameters
from .checkpoints.kinds import HUGGING_FACE, Checkpoint, check_quantization, identify
from .errors import CheckpointError
from .hub import local_or_download

__all__ = ["SFLLaVA", "cast_model", "default_dtype", "load", "load_sfllava", "num_parameters",
           "resolve_model_path"]

# What a model directory needs from the hub (any kind): never pickles, never code.
MODEL_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.txt", "*.jinja",
               "vision_tower.mlpackage/*"]
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
Dtype = Union[mx.Dtype, str, None]


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory, or a hub repo id downloaded (and cached) by huggingface-hub."""
    return local_or_download(str(path_or_repo), MODEL_FILES, "model")


def _dtype_name(dtype: Dtype) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("mlx.core.")


class _Known:
    """mlx-lm's ModelArgs role, for a ModelConfig already read or mapped."""

    def __init__(self, config):
        self.config = config

    def from_dict(self, _):
        return self.config


def load_sfllava(path_or_repo, dtype: Dtype = None, lazy: bool = False) -> SFLLaVA:
    """An MLX model directory (ours, or mlx-vlm's in place) without its tokenizer."""
    ckpt = identify(resolve_model_path(str(path_or_repo)))
    if ckpt.kind == HUGGING_FACE:
        raise CheckpointError(f"{ckpt.path} is a Hugging Face checkpoint, not an MLX model: "
                              "load() converts it on first use, `sfllava convert` ahead")
    return _load_mlx(ckpt, dtype, lazy)


def _load_mlx(ckpt: Checkpoint, dtype: Dtype, lazy: bool) -> SFLLaVA:
    cfg = ckpt.model_config()
    check_quantization(cfg.quantization)
    try:  # mlx-lm's loader: sanitize, then quantize exactly the modules with .scales
        model, _ = load_model(ckpt.path, lazy=True,
                              get_model_classes=lambda config: (SFLLaVA, _Known(cfg)))
    except FileNotFoundError:
        raise CheckpointError(f"no model*.safetensors in {ckpt.path}: not a converted model") from None
    except ValueError as e:
        raise CheckpointError(f"weights do not match config.json: {e}") from None
    except RuntimeError as e:  # a weight file that cannot be read
        raise CheckpointError(f"cannot read the weights in {ckpt.path}: {e}") from None
    dtype = (getattr(mx, dtype) if isinstance(dtype, str) else dtype) or default_dtype()
    if dtype is not None:
        cast_model(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
    model.path = ckpt.path
    return model


def load(path_or_repo, dtype: Dtype = None, lazy: bool = False, *, quantize: bool = False,
         q_bits: int = 4, q_group_size: int = 64, cache_dir: Optional[Path] = None):
    """Any model `--model` takes: returns (SFLLaVA, mlx-lm TokenizerWrapper).

    dtype, quantize, q_bits, q_group_size mean what they mean to `sfllava convert` for a
    Hugging Face checkpoint (converted once into `cache_dir`, default
    $XDG_CACHE_HOME/sfllava/models); an MLX model is only cast to dtype."""
    from .checkpoints.cached import Settings, converted

    ckpt = identify(resolve_model_path(str(path_or_repo)))
    if ckpt.kind == HUGGING_FACE:
        settings = Settings(_dtype_name(dtype), quantize, q_bits, q_group_size)
        local = ckpt.path == Path(str(path_or_repo)).expanduser()
        name = ckpt.path.resolve().name if local else str(path_or_repo)  # a repo id as given
        ckpt = identify(converted(ckpt.path, name, settings, cache_dir))
    elif quantize:
        raise CheckpointError(
            f"-q quantizes a Hugging Face checkpoint as it is converted; {ckpt.path} is already "
            f"an MLX model ({ckpt.kind}" + (", quantized)" if ckpt.quantization else ")"))
    model = _load_mlx(ckpt, dtype, lazy)
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
