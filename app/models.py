"""`sfllava models`: the runnable models already on disk (design.md §5.4) — the Hugging Face hub
cache and the converted-model cache — with family, format, size and quantization, as
`mlx_lm.manage --scan` lists LLMs."""

from __future__ import annotations

import json
from pathlib import Path

from .fmt import human_bytes


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list")


def describe(path: Path, name: str, size: int, where: str):
    """One row for a directory that runs here, None for anything else."""
    from sfllava_mlx.checkpoints.kinds import identify
    from sfllava_mlx.errors import UserError

    try:
        ckpt = identify(path)
        cfg = ckpt.model_config()
    except UserError:
        return None  # not a model, or one that does not run here: not listed
    return {"name": name, "family": cfg.family, "format": ckpt.kind,
            "quantization": cfg.quantization, "dtype": cfg.dtype, "size_bytes": size,
            "path": str(path), "where": where}


def hub_models() -> list:
    """The newest snapshot of each model repo in the hub cache (HF_HUB_CACHE, HF_HOME)."""
    import huggingface_hub
    from huggingface_hub.errors import CacheNotFound

    try:
        info = huggingface_hub.scan_cache_dir()
    except CacheNotFound:
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        rows.append(describe(Path(rev.snapshot_path), repo.repo_id, repo.size_on_disk, "hub cache"))
    return [r for r in rows if r]


def converted_models() -> list:
    """What the first use of Hugging Face checkpoints converted ($XDG_CACHE_HOME/sfllava/models)."""
    from sfllava_mlx.checkpoints.cached import models_root

    root = models_root()
    rows = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir():
            continue  # a conversion still being written
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        rows.append(describe(d, d.name, size, "converted"))
    return [r for r in rows if r]


def quantization(q) -> str:
    if not q:
        return "-"
    mode = q.get("mode", "affine")
    return f"{q['bits']}-bit g{q['group_size']}" + ("" if mode == "affine" else f" {mode}")


def main(args) -> int:
    rows = hub_models() + converted_models()
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not rows:
        console.print("no runnable models in the hub cache or the converted-model cache")
        return 0
    table = Table(title="runnable models on disk")
    for col, justify in (("model", "left"), ("family", "left"), ("format", "left"),
                         ("quantization", "left"), ("size", "right"), ("where", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r["name"], r["family"], r["format"], quantization(r["quantization"]),
                      human_bytes(r["size_bytes"]), r["where"])
    console.print(table)
    return 0
