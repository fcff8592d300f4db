"""Writing a file so that nothing half-written is ever seen, and it survives a power cut:
one function every writer uses (the cache's JSON, batch results, chat transcripts)."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import Union


def write_atomic(path, data: Union[bytes, str]) -> Path:
    """Replace `path` with `data` (text as UTF-8): a temporary file beside it, synced,
    renamed over it, the directory synced. A failure leaves `path` as it was."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            sync(f.fileno())
        try:
            os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes it private; the file is not
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def sync(fd: int) -> None:
    """Data on the disk, not in a cache: macOS's fsync stops at the drive's cache, its
    F_FULLFSYNC does not (a power cut keeps what it synced)."""
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:  # not supported by this file system: fsync then
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """A rename or a new file made durable: the directory holding it synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
