"""The cache's files: atomic writes, checked reads, and telling an entry from its replacement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..files import write_atomic
from .fingerprint import Fingerprint, content_digest

META_FILE = "meta.json"


class CorruptEntry(Exception):
    """An entry that fails a check: dropped by the caller."""


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"{path.name}: {e}") from None


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": content_digest(path)}


def check_file(path: Path, record: dict) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CorruptEntry(f"{path.name}: {e}") from None
    if size != record.get("bytes"):
        raise CorruptEntry(f"{path.name}: {size} bytes, expected {record.get('bytes')}")
    if content_digest(path) != record.get("sha256"):
        raise CorruptEntry(f"{path.name}: checksum mismatch")


def recheck_video(entry: dict, path: Path, fp: Fingerprint) -> None:
    """CorruptEntry unless the video `entry` recorded (its "video": `mtime_ns`, `sha256`) is
    the file `fp` fingerprints. The mtime is a hint: where it moved, the whole content must
    match, and the entry is rewritten at `path` with the new one, so that the next lookup
    skips the full read (a read-only disk only costs it that read again)."""
    video = entry["video"]
    if video.get("mtime_ns") == fp.mtime_ns:
        return
    full = video.get("sha256")
    if not full or content_digest(fp.path) != full:
        raise CorruptEntry("the video changed (same size and sampled blocks, other content)")
    video.update(mtime_ns=fp.mtime_ns, path=fp.path)
    try:
        write_json(path, entry)
    except OSError:
        pass


def publish(tmp: Path, final: Path) -> bool:
    """Rename a complete temporary directory into place; False if another writer won."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:  # final exists and is not empty: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def identity(path: Path):
    """Tells an entry (or prefix) directory apart from one that replaced it: its inode and
    the random id written in its meta.json (inodes of deleted entries get reused).
    None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        made = json.loads((path / META_FILE).read_text()).get("id")
    except (OSError, ValueError, AttributeError):
        made = None
    return (st.st_dev, st.st_ino, made)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
