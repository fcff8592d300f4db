"""Tiny SF-LLaVA-1.5-shaped SOURCE checkpoints, with Hugging Face names, and the other tiny
things the tests, the demo and the benchmarks make on the fly.

Tests, the demo and the benchmarks need a checkpoint that looks exactly like a
real one (config.json fields, tensor names and shapes of design.md §5.2, a Qwen2
byte-level BPE tokenizer) but fits in a few hundred kilobytes. This module
writes one from random weights with a fixed seed, using numpy, safetensors'
file format and `tokenizers` only (torch is optional where `make demo` runs).

    from sfllava_convert.tiny import LLM, Tower, write_source_checkpoint
    src = write_source_checkpoint(tmp_path / "src", "oryx-vit", llm=LLM(tied=False), seed=0)

Every tensor draws from its own generator seeded by (seed, name), so adding or
dropping one tensor does not change the others.

Beside it, imported by their module (each needs what this package does not): `videos`
(test videos), `pictures`, `whisper` (a tiny Whisper for the speech path) and `command`
(`sfllava` in a subprocess, `sfllava serve` on a loopback port).
"""

from .checkpoint import LLM, Extras, Files, Tower, write_source_checkpoint
from .tensors import read_source_tensors, read_tensors
from .tokenizer import build_tokenizer, write_tokenizer

__all__ = ["LLM", "Extras", "Files", "Tower", "build_tokenizer", "read_source_tensors",
           "read_tensors", "write_source_checkpoint", "write_tokenizer"]
