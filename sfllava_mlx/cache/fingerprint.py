"""What a video (or picture) and a model are, for the cache: content fingerprints that cost
a few sampled blocks, never a full read, and a full hash computed in the background."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SAMPLE_BLOCKS = 64  # blocks hashed per file for its fingerprint
BLOCK_BYTES = 64 * 1024


def sampled_digest(path, blocks: int = SAMPLE_BLOCKS, block: int = BLOCK_BYTES,
                   file=None) -> tuple[int, str]:
    """(size, sha256 of the size and `blocks` evenly spaced blocks, first and last included).

    Reads at most blocks * block bytes whatever the file's length (the whole file when
    it is smaller than that); through `file` where it is open already.
    """
    if file is None:
        with open(path, "rb") as f:
            return sampled_digest(path, blocks, block, f)
    size = os.fstat(file.fileno()).st_size
    h = hashlib.sha256(f"{size}:".encode())
    if size <= blocks * block:
        h.update(os.pread(file.fileno(), size, 0))
    else:
        last = size - block
        for i in range(blocks):
            h.update(os.pread(file.fileno(), block, i * last // (blocks - 1)))
    return size, h.hexdigest()


def content_digest(path, chunk: int = 8 << 20, fd: Optional[int] = None) -> str:
    """SHA-256 of the whole file, or of the open file `fd` (read with pread: its offset is
    not moved). hashlib releases the GIL: runs well in a thread."""
    if fd is None:
        with open(path, "rb") as f:
            return content_digest(path, chunk, f.fileno())
    h = hashlib.sha256()
    offset = 0
    while data := os.pread(fd, chunk, offset):
        h.update(data)
        offset += len(data)
    return h.hexdigest()


@dataclass
class Fingerprint:
    """A file's content fingerprint (design.md §4): its size and sampled digest; mtime a hint."""

    path: str
    size: int
    sampled: str  # sampled_digest: the part of the key
    mtime_ns: int  # a hint only

    @classmethod
    def of(cls, path, file=None) -> Fingerprint:
        """`file`: the file already open (a media.Video's), read without reopening it."""
        path = os.path.abspath(path)
        if file is None:
            with open(path, "rb") as f:
                return cls.of(path, f)
        st = os.fstat(file.fileno())
        size, sampled = sampled_digest(path, file=file)
        return cls(path, size, sampled, st.st_mtime_ns)


class ContentHasher:
    """The full hash of a file, computed in a background thread; `fd`: a descriptor of it
    already open, which the hasher owns (and closes)."""

    def __init__(self, path, fd: Optional[int] = None):
        self._result: Optional[str] = None
        self._thread = threading.Thread(target=self._run, args=(path, fd), daemon=True)
        self._thread.start()

    def _run(self, path, fd):
        try:
            self._result = content_digest(path, fd=fd)
        except OSError:
            self._result = None
        finally:
            if fd is not None:
                os.close(fd)

    def result(self) -> Optional[str]:
        self._thread.join()
        return self._result


def model_identity(model) -> str:
    """A stable id of a model's weights and tokenizer: the content of its JSON files and
    the sampled fingerprint of every other file (weights: their headers and sampled data
    blocks). A model built in memory (benchmarks) sets `model.identity` itself."""
    if model.identity:
        return str(model.identity)
    if model.path is None:
        raise ValueError("model has neither a path nor an identity: it cannot be cached")
    return directory_identity(model.path)


def directory_identity(path) -> str:
    """The content identity of a model directory (a converted model, an mlx-vlm one, a
    Hugging Face checkpoint, a Whisper model): its JSON files whole, the others by sampled
    fingerprint, and the files of its Core ML package (a directory) by theirs."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(root.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir() and f.suffix == ".mlpackage":
            for part in sorted(p for p in f.rglob("*") if p.is_file()):
                size, digest = sampled_digest(part, blocks=16)
                h.update(f"{part.relative_to(root)}:{size}:{digest}".encode())
        elif not f.is_file():
            continue
        elif f.suffix == ".json":
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in (".safetensors", ".npz", ".txt", ".model", ".jinja"):
            size, digest = sampled_digest(f, blocks=16)
            h.update(f"{f.name}:{size}:{digest}".encode())
    return h.hexdigest()[:24]
