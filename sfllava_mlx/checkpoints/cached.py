"""A Hugging Face checkpoint used as it is (design.md §5.4): converted on first use into
`$XDG_CACHE_HOME/sfllava/models/`, by the one conversion `sfllava convert` runs (a
temporary directory, then a rename), keyed by the source's content identity and the
conversion settings, and reused from then on without being written again."""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cache.fingerprint import directory_identity
from ..cache.store import cache_root
from ..errors import UserError
from .convert import DTYPES, convert, default_dtype, version
from .source import open_checkpoint


@dataclass(frozen=True)
class Settings:
    """`convert`'s --dtype, -q, --q-bits, --q-group-size, with their meaning there."""

    dtype: Optional[str] = None  # None: the checkpoint's (float32 on MLX's CPU backend)
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64

    def resolved(self, source_dtype: str) -> Settings:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        return Settings(self.dtype or default_dtype(source_dtype), self.quantize,
                        self.q_bits if self.quantize else 0,
                        self.q_group_size if self.quantize else 0)

    @property
    def label(self) -> str:
        return self.dtype + (f"-q{self.q_bits}g{self.q_group_size}" if self.quantize else "")


def models_root() -> Path:
    return cache_root() / "models"


def cached_path(source: Path, name: str, settings: Settings, root: Optional[Path] = None) -> Path:
    """Where the conversion of `source` with `settings` lives (or will)."""
    resolved = settings.resolved(open_checkpoint(source).dtype)
    key = hashlib.sha256("\0".join([directory_identity(source), resolved.label,
                                    version()]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/")).strip("-.") or "model"
    return Path(root or models_root()) / f"{slug[-80:]}-{resolved.label}-{key}"


def converted(source: Path, name: str, settings: Settings = Settings(),
              root: Optional[Path] = None) -> Path:
    """The MLX model directory of a Hugging Face checkpoint: converted now if it is not yet."""
    dst = cached_path(source, name, settings, root)
    if (dst / "config.json").exists():
        return dst  # converted before: read, never written again
    with _progress(f"converting {name} for its first use (into {dst.parent})"):
        try:
            convert(str(source), str(dst), dtype=settings.dtype, quantize=settings.quantize,
                    q_bits=settings.q_bits, q_group_size=settings.q_group_size)
        except (UserError, OSError):
            if not (dst / "config.json").exists():
                raise
            # another process converted the same checkpoint meanwhile: its copy is the same
    return dst


class _progress:
    """A rich spinner on a terminal (stderr); nothing when output goes elsewhere."""

    def __init__(self, text: str):
        self.text, self.status = text, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status(self.text)
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)
        return False
