"""Reading a source checkpoint: config, tokenizer files and tensors.

Safetensors files are checked (header, size) before anything is converted, so a
truncated download fails with one clear line. Tensors load lazily through
`mx.load`, one file at a time as the writer needs them. PyTorch pickles load only
when the user opts in, then with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..errors import CheckpointError, UserError

SAFETENSORS_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")  # trainer pickles
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
)
# Besides the weights, what conversion reads or copies.
AUX_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
             "video_preprocessor_config.json") + TOKENIZER_FILES


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str  # numpy-style name: "bfloat16", "float32", ...
    file: Path


@dataclass
class SourceCheckpoint:
    path: Path
    config: dict
    tensors: dict  # name -> TensorInfo
    format: str  # "safetensors" or "pickle"
    preprocessor: Optional[dict] = None
    image_preprocessor: Optional[dict] = None  # preprocessor_config.json alone (pictures)
    _loaded: dict = field(default_factory=dict, repr=False)  # file -> {name: mx.array}

    @property
    def names(self) -> list:
        return list(self.tensors)

    @property
    def dtype(self) -> str:
        """The checkpoint's float dtype: the one most parameters have."""
        counts: dict = {}
        for t in self.tensors.values():
            if t.dtype.startswith(("float", "bfloat")):
                n = 1
                for s in t.shape:
                    n *= s
                counts[t.dtype] = counts.get(t.dtype, 0) + n
        return max(counts, key=counts.get) if counts else "float32"

    def release(self) -> None:
        """Forget the loaded files (arrays still in use elsewhere stay alive)."""
        self._loaded.clear()

    def load(self, name: str) -> mx.array:
        file = self.tensors[name].file
        if file not in self._loaded:
            self._loaded[file] = _load_file(file, self.format)
        return self._loaded[file][name]


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def safetensors_header(file: Path) -> dict:
    """{name: TensorInfo} from a safetensors file's header, checked by the safetensors
    library (a truncated download is an error), without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            out = {}
            for name in f.keys():
                entry = f.get_slice(name)
                dtype = entry.get_dtype()
                out[name] = TensorInfo(tuple(entry.get_shape()),
                                       SAFETENSORS_DTYPES.get(dtype, dtype.lower()), file)
            return out
    except SafetensorError as e:
        raise CheckpointError(f"{file.name} is truncated or not a safetensors file ({e}): "
                              "download it again") from None


def _load_file(file: Path, fmt: str) -> dict:
    if fmt == "pickle":
        return _load_pickle(file)
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(f"cannot read {file.name}: {e}") from None


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError(
            "reading PyTorch pickles needs torch, which is not installed "
            "(pip install torch, or convert the checkpoint to safetensors)") from None
    return torch


def _load_pickle(file: Path) -> dict:
    torch = _torch()
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {file.name} with torch.load(weights_only=True): {e}") from None
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        for key in ("state_dict", "model", "module"):  # common wrappers
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    out = {}
    for name, t in state.items():
        if not torch.is_tensor(t):
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        a = mx.array(t.float().numpy() if t.is_floating_point() else t.numpy())
        out[name] = a.astype(getattr(mx, dtype)) if t.is_floating_point() else a
    return out


def _pickle_weight_files(path: Path) -> list:
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        return [path / f for f in sorted(set(_read_json(index).get("weight_map", {}).values()))]
    return sorted(p for p in path.iterdir()
                  if p.suffix in PICKLE_SUFFIXES and p.is_file() and not p.name.startswith(NOT_WEIGHTS))


def weight_files(path: Path, allow_pickle: bool) -> tuple[str, list]:
    """The weight files of a checkpoint directory and their format."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(
                f"{path} is missing {len(missing)} weight shard(s) named in its index: "
                + ", ".join(missing))
        return "safetensors", [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return "safetensors", files
    pickles = _pickle_weight_files(path)
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} holds only PyTorch pickle weights ({', '.join(p.name for p in pickles)}); "
                "pickles can run code when loaded: pass --allow-pickle to read them "
                "with torch.load(weights_only=True)")
        return "pickle", pickles
    raise CheckpointError(f"{path} has no weights (*.safetensors, or *.bin/*.pth with --allow-pickle)")


def open_checkpoint(path: Path, allow_pickle: bool = False) -> SourceCheckpoint:
    """Read config.json, check every weight file and list the tensors (no tensor data yet)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint")
    config = _read_json(path / "config.json")
    fmt, files = weight_files(path, allow_pickle)
    tensors: dict = {}
    loaded: dict = {}
    for f in files:
        if fmt == "safetensors":
            infos = safetensors_header(f)
        else:  # a pickle's shapes are only known by loading it: keep what was loaded
            loaded[f] = _load_pickle(f)
            infos = {name: TensorInfo(tuple(a.shape), str(a.dtype).removeprefix("mlx.core."), f)
                     for name, a in loaded[f].items()}
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    # A video preprocessor's values (llava-hf) win for videos over the image processor's.
    pre = [_read_json(path / f) for f in ("preprocessor_config.json", "video_preprocessor_config.json")
           if (path / f).exists()]
    return SourceCheckpoint(path=path, config=config, tensors=tensors, format=fmt,
                            preprocessor={k: v for p in pre for k, v in p.items()} if pre else None,
                            image_preprocessor=(_read_json(path / "preprocessor_config.json")
                                                if (path / "preprocessor_config.json").exists() else None),
                            _loaded=loaded)


def tokenizer_size(path: Path) -> Optional[int]:
    """Number of token ids the tokenizer can produce (None if it cannot be told cheaply)."""
    tj = path / "tokenizer.json"
    if tj.exists():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tj)).get_vocab_size(with_added_tokens=True)
        except Exception as e:
            raise CheckpointError(f"{tj} cannot be read by the tokenizers library: {e}") from None
    vj = path / "vocab.json"
    if vj.exists():
        ids = list(_read_json(vj).values())
        added = path / "added_tokens.json"
        if added.exists():
            ids += list(_read_json(added).values())
        return max(ids) + 1 if ids else 0
    return None


def check_tokenizer(path: Path) -> list:
    """The tokenizer files present; a checkpoint without a usable tokenizer is an error."""
    present = [f for f in TOKENIZER_FILES if (path / f).exists()]
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
        raise CheckpointError(
            f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return present
