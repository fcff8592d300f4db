"""A source checkpoint from a local directory or the Hugging Face hub (only the files needed)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from sfllava_mlx.errors import CheckpointError

from .source import AUX_FILES

SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.pth", "*.pt", "pytorch_model.bin.index.json"]


def looks_like_repo_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and all(s.split("/"))


def resolve_source(hf_path: str, allow_pickle: bool = False) -> Path:
    """A local checkpoint directory, or a hub repo downloaded with its progress bars."""
    path = Path(hf_path).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(hf_path):
        raise CheckpointError(f"checkpoint not found: {hf_path} (no such directory, not a repo id)")
    local = _download(hf_path, list(AUX_FILES) + SAFETENSORS_PATTERNS)
    if allow_pickle and not any(local.glob("*.safetensors")):
        local = _download(hf_path, list(AUX_FILES) + PICKLE_PATTERNS)  # pickles only as a fallback
    return local


def _download(repo: str, patterns: list) -> Path:
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # network, auth, unknown repo: the user's to fix
        raise CheckpointError(f"cannot download {repo!r} from the Hugging Face hub: {e}") from None
