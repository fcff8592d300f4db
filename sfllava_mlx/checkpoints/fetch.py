"""A source checkpoint from a local directory or the Hugging Face hub (only the files needed)."""

from __future__ import annotations

from pathlib import Path

from ..hub import download, local_or_download
from .source import AUX_FILES

SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.pth", "*.pt", "pytorch_model.bin.index.json"]


def resolve_source(hf_path: str, allow_pickle: bool = False) -> Path:
    """A local checkpoint directory, or a hub repo downloaded with its progress bars."""
    local = local_or_download(hf_path, list(AUX_FILES) + SAFETENSORS_PATTERNS, "checkpoint")
    if local == Path(hf_path).expanduser():
        return local
    if allow_pickle and not any(local.glob("*.safetensors")):
        local = download(hf_path, list(AUX_FILES) + PICKLE_PATTERNS)  # pickles only as a fallback
    return local
