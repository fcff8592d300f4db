"""The persistent video cache (design.md §4): a video's work kept across sessions.

One entry per (video content, model, frame sampling, dtype, vision backend) holds the
pooled visual tokens and, per system prompt, the KV cache of the prompt prefix up to the
end of the video (mlx-lm's `save_prompt_cache`), so reopening a video skips decoding,
the vision tower and the prefill of ~8K tokens.

    $XDG_CACHE_HOME/sfllava/v1/<key>/
        meta.json             what the entry is for, the clip's frames, file checksums
        visual.safetensors    pooled visual tokens (Nv, D)
        last_used             its mtime is the entry's last access (LRU eviction)
        kv-<kvkey>/           one per system prompt / KV setting
            meta.json, prompt.safetensors

Trust nothing read back: every file is checked against the size and SHA-256 recorded
when it was written, and shapes against the model; a bad entry is dropped and rebuilt.
Writers build an entry in a private temporary directory and `rename` it into place, so
readers only ever see complete entries and concurrent writers cannot mix their files
(the first rename wins, the others discard theirs). Removal renames an entry aside
before deleting it, for the same reason.

The video's key is its size plus hashes of sampled blocks, never a full read. The
modification time is only a hint: when it differs from the one recorded, the whole
file is hashed once and compared with the full hash stored with the entry (hashed in
the background while the first open decodes frames).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..frames.reader import SampledFrames
from .files import (
    META_FILE,
    CorruptEntry,
    check_file,
    dir_bytes,
    file_record,
    identity,
    publish,
    read_json,
    recheck_video,
    write_json,
)
from .fingerprint import Fingerprint
from .keys import CacheKey

FORMAT = "v1"
DEFAULT_MAX_GB = 10.0
VISUAL_FILE = "visual.safetensors"
KV_FILE = "prompt.safetensors"
LAST_USED = "last_used"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sfllava"


def max_cache_bytes() -> int:
    """The size cap: $SFLLAVA_CACHE_MAX_GB (default 10 GB)."""
    value = os.environ.get("SFLLAVA_CACHE_MAX_GB")
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9)



# ----------------------------------------------------------------------------------------
# The cache


@dataclass
class Entry:
    path: Path
    meta: dict
    visual: mx.array

    def clip(self, info_type) -> SampledFrames:
        """The clip the entry was made from, without its pixels; its info an `info_type`
        (frames.VideoInfo, or image.PictureLayout)."""
        return SampledFrames.from_record(self.meta["clip"], info_type)


@dataclass
class EntryInfo:
    """One line of `sfllava cache ls`."""

    key: str
    video: str
    model: str
    num_frames: int
    seek: str
    bytes: int
    last_used: float
    prefixes: int


class VideoCache:
    def __init__(self, root: Optional[Path] = None, max_bytes: Optional[int] = None):
        self.root = Path(root or cache_root()) / FORMAT
        self.max_bytes = max_cache_bytes() if max_bytes is None else max_bytes
        self.dropped: list[str] = []  # why entries were dropped (reported by the app)

    # -- paths ---------------------------------------------------------------
    def entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.digest()

    def _tmp_dir(self) -> Path:
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        return tmp

    def drop(self, path: Path, reason: str = "") -> None:
        """Remove an entry (or one prefix of it): rename aside, then delete."""
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except OSError:
            return  # already gone (another process dropped or evicted it)
        if reason:
            self.dropped.append(f"{path.name}: {reason}")
        shutil.rmtree(trash, ignore_errors=True)

    # -- visual tokens -------------------------------------------------------
    def lookup(self, key: CacheKey, fingerprint: Fingerprint, *, num_tokens: int,
               hidden_size: int) -> Optional[Entry]:
        """The entry for this key, checked; None (and the entry dropped) when it fails."""
        path = self.entry_dir(key)
        ident = identity(path)
        if ident is None:
            return None
        try:
            meta = read_json(path / META_FILE)
            if meta.get("key") != asdict(key):
                raise CorruptEntry("key material differs")
            recheck_video(meta, path / META_FILE, fingerprint)
            check_file(path / VISUAL_FILE, meta["files"][VISUAL_FILE])
            try:
                visual = mx.load(str(path / VISUAL_FILE))["visual"]
            except Exception as e:
                raise CorruptEntry(f"{VISUAL_FILE}: {e}") from None
            if tuple(visual.shape) != (num_tokens, hidden_size) or str(visual.dtype) != meta["dtype"]:
                raise CorruptEntry(f"visual tokens {visual.shape} {visual.dtype} do not fit the model")
            if len(meta["clip"]["indices"]) != key.num_frames:
                raise CorruptEntry("frame list does not match --num-frames")
        except (CorruptEntry, KeyError, TypeError, OSError) as e:  # OSError: a racing drop
            self._drop_if_same(path, ident, str(e))
            return None
        if identity(path) != ident:  # replaced while read: trust neither copy
            return None
        self.touch(path)
        return Entry(path, meta, visual)

    def _drop_if_same(self, path: Path, ident, reason: str) -> None:
        """Drop a bad entry, unless another process already replaced or removed it (then
        what failed was a read racing that process, not a corrupt entry)."""
        if identity(path) == ident:
            self.drop(path, reason)

    def cached_timestamps(self, key: CacheKey) -> Optional[list]:
        """The sampled frames' timestamps an entry recorded, from its meta.json alone (not
        checked: `lookup` checks the entry when it is opened). What a cached video's
        subtitles are selected by before it is opened."""
        try:
            return [float(t) for t in read_json(self.entry_dir(key) / META_FILE)["clip"]["timestamps"]]
        except (CorruptEntry, KeyError, TypeError, ValueError):
            return None

    def store(self, key: CacheKey, fingerprint: Fingerprint, visual: mx.array, clip, *,
              content_sha256: Optional[str], model_name: str) -> Optional[Path]:
        """Write an entry for the visual tokens (no-op if another process has written it)."""
        final = self.entry_dir(key)
        if final.is_dir():
            return final
        tmp = self._tmp_dir()
        try:
            mx.save_safetensors(str(tmp / VISUAL_FILE), {"visual": visual})
            meta = {
                "format": FORMAT,
                "id": uuid.uuid4().hex,
                "key": asdict(key),
                "video": {"name": os.path.basename(fingerprint.path), "path": fingerprint.path,
                          "size": fingerprint.size, "mtime_ns": fingerprint.mtime_ns,
                          "sha256": content_sha256},
                "model": model_name,
                "dtype": str(visual.dtype),
                "visual_tokens": int(visual.shape[0]),
                "clip": clip.record(),
                "created": time.time(),
                "files": {VISUAL_FILE: file_record(tmp / VISUAL_FILE)},
            }
            write_json(tmp / META_FILE, meta)
            (tmp / LAST_USED).touch()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, final)
        self.evict(keep=final)
        return final if final.is_dir() else None

    # -- prefix KV caches ----------------------------------------------------
    def load_prefix(self, entry: Entry, kv_key: str, *, length: int, num_layers: int) -> Optional[list]:
        from mlx_lm.models.cache import load_prompt_cache

        path = entry.path / f"kv-{kv_key}"
        ident = identity(path)
        if ident is None:
            return None
        try:
            meta = read_json(path / META_FILE)
            check_file(path / KV_FILE, meta["files"][KV_FILE])
            try:
                cache, saved = load_prompt_cache(str(path / KV_FILE), return_metadata=True)
            except Exception as e:
                raise CorruptEntry(f"{KV_FILE}: {e}") from None
            if saved.get("kv_key") != kv_key or len(cache) != num_layers:
                raise CorruptEntry("prompt cache is for another prefix or model")
            for c in cache:
                k = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
                if c.offset != length or k.shape[2] < length:
                    raise CorruptEntry(f"prompt cache holds {c.offset} tokens, expected {length}")
        except (CorruptEntry, KeyError, TypeError, AttributeError) as e:
            self._drop_if_same(path, ident, str(e))
            return None
        if identity(path) != ident:
            return None
        self.touch(entry.path)
        return cache

    def store_prefix(self, entry_path: Path, kv_key: str, cache: list, *, length: int,
                     system_prompt: str) -> bool:
        from mlx_lm.models.cache import save_prompt_cache

        from ..kv import copy_prefix  # mlx-lm: imported by what writes, not by `cache ls`

        final = entry_path / f"kv-{kv_key}"
        if final.is_dir() or not entry_path.is_dir():
            return False
        state = copy_prefix(cache, length)
        if state is None:
            return False
        tmp = self._tmp_dir()
        try:
            save_prompt_cache(str(tmp / KV_FILE), state, {"kv_key": kv_key, "length": str(length)})
            write_json(tmp / META_FILE, {"id": uuid.uuid4().hex, "kv_key": kv_key,
                                          "length": length, "system_prompt": system_prompt,
                                          "files": {KV_FILE: file_record(tmp / KV_FILE)}})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # The entry may have been evicted meanwhile: then this prefix goes too.
        published = entry_path.is_dir() and publish(tmp, final)
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep=entry_path)
        return published

    # -- housekeeping --------------------------------------------------------
    @staticmethod
    def touch(path: Path) -> None:
        try:
            os.utime(path / LAST_USED)
        except OSError:
            pass

    def _entry_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def _sweep(self, older_than_s: float = 3600.0) -> None:
        """Leftovers of writers that died mid-write (an hour old: nobody is writing them)."""
        if not self.root.is_dir():
            return
        now = time.time()
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                try:
                    if now - p.stat().st_mtime > older_than_s or p.name.startswith(".trash-"):
                        shutil.rmtree(p, ignore_errors=True)
                except OSError:
                    pass

    def entries(self) -> list[EntryInfo]:
        out = []
        for p in self._entry_dirs():
            try:
                meta = json.loads((p / META_FILE).read_text())
                last = (p / LAST_USED).stat().st_mtime
                out.append(EntryInfo(
                    key=p.name, video=meta["video"]["path"], model=meta.get("model", "?"),
                    num_frames=meta["key"]["num_frames"], seek=meta["key"]["seek"],
                    bytes=dir_bytes(p), last_used=last,
                    prefixes=sum(1 for q in p.iterdir() if q.name.startswith("kv-"))))
            except (OSError, ValueError, KeyError, TypeError):
                out.append(EntryInfo(p.name, "(unreadable)", "?", 0, "?", dir_bytes(p), 0.0, 0))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: Optional[Path] = None) -> list[str]:
        """Drop least recently used entries until the cache fits its cap."""
        self._sweep()
        sized = []
        for p in self._entry_dirs():
            try:
                last = (p / LAST_USED).stat().st_mtime
            except OSError:
                last = 0.0
            sized.append((last, p, dir_bytes(p)))
        total = sum(s for _, _, s in sized)
        evicted = []
        # Oldest first; the entry being used goes last, and only if it alone is too big.
        for _, p, size in sorted(sized, key=lambda t: (keep is not None and t[1] == keep, t[0])):
            if total <= self.max_bytes:
                break
            self.drop(p)
            evicted.append(p.name)
            total -= size
        return evicted

    def clear(self) -> int:
        entries = self._entry_dirs()
        for p in entries:
            self.drop(p)
        self._sweep()
        return len(entries)
