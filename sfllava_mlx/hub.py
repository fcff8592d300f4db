"""The Hugging Face hub: reached only when the user names a repo id, and only for the files
asked for (never pickles unless the user opted in, never code)."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def looks_like_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def download(repo: str, patterns: list) -> Path:
    """The repo's files matching `patterns`, downloaded (and cached) by huggingface-hub."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # network, auth, unknown repo: all the user's to fix
        first, _, rest = str(e).strip().partition("\n")  # one line; the hub's story after it
        raise CheckpointError(f"cannot download {repo!r} from the Hugging Face hub: {first}",
                              details=rest.strip()) from None


def check_reference(path_or_repo: str, what: str = "model") -> None:
    """A local path that exists, or a hub repo id: anything else is not found."""
    if not Path(path_or_repo).expanduser().exists() and not looks_like_repo_id(path_or_repo):
        raise CheckpointError(f"{what} not found: {path_or_repo} (no such directory, not a repo id)")


def local_or_download(path_or_repo: str, patterns: list, what: str = "model") -> Path:
    """A local directory, or a hub repo id downloaded; anything else is not found."""
    check_reference(path_or_repo, what)
    path = Path(path_or_repo).expanduser()
    return path if path.exists() else download(path_or_repo, patterns)
