"""The persistent video cache (design.md §4): fingerprints, the one key, and the store."""

from .fingerprint import ContentHasher, Fingerprint, content_digest, model_identity, sampled_digest
from .keys import CacheKey, image_key, prefix_key, transcript_key, video_key
from .store import Entry, EntryInfo, VideoCache, cache_root, max_cache_bytes
from .transcripts import TranscriptCache, TranscriptInfo

__all__ = ["CacheKey", "ContentHasher", "Entry", "EntryInfo", "Fingerprint",
           "TranscriptCache", "TranscriptInfo", "VideoCache", "cache_root", "content_digest",
           "image_key", "max_cache_bytes", "model_identity", "prefix_key", "sampled_digest",
           "transcript_key", "video_key"]
