"""Tiny SF-LLaVA-1.5-shaped SOURCE checkpoints, with Hugging Face names.

Tests, the demo and the benchmarks need a checkpoint that looks exactly like a
real one (config.json fields, tensor names and shapes of SPEC §3, a Qwen2
byte-level BPE tokenizer) but fits in a few hundred kilobytes. This module
writes one from random weights with a fixed seed, using numpy, safetensors'
file format and `tokenizers` only (torch is optional where `make demo` runs).

    from sfllava_convert.tiny import write_source_checkpoint
    src = write_source_checkpoint(tmp_path / "src", layout="oryx-vit", seed=0)

Every tensor draws from its own generator seeded by (seed, name), so adding or
dropping one tensor does not change the others.
"""

from .checkpoint import write_source_checkpoint
from .tensors import read_source_tensors, read_tensors
from .tokenizer import build_tokenizer, write_tokenizer

__all__ = ["build_tokenizer", "read_source_tensors", "read_tensors", "write_source_checkpoint",
           "write_tokenizer"]
