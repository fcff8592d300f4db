"""BENCH, read as published (design.md §9): a file or a directory of them (parquet, JSON, JSON
Lines), or a hub dataset id downloaded with huggingface-hub; the format recognised by its
fields (`FORMATS`, the most specific first).

A directory (a hub snapshot, MVBench's folder of tasks) is every such file under it that holds
one format's rows; files of no format (a test split without answers, metadata) are left out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sfllava_mlx.errors import UserError

from . import longvideobench, mvbench, videomme

FORMATS = (longvideobench, videomme, mvbench)
SUFFIXES = (".parquet", ".json", ".jsonl")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Benchmark:
    format: object  # the module of its format
    questions: list  # Question, in the benchmark's order
    files: list  # the files read


def by_name(name: str):
    return next(f for f in FORMATS if f.NAME == name)


def load(bench: str) -> Benchmark:
    path = Path(os.path.expanduser(bench))
    if not path.exists():
        if not REPO_ID.match(bench):
            raise UserError(f"benchmark not found: {bench} (a file, a directory or a hub "
                            "dataset id)")
        path = download(bench)
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(path).parts))
    if not files:
        raise UserError(f"{bench} holds no parquet, JSON or JSON Lines file")
    found, closest = [], None
    for f in files:
        rows = read_rows(f)
        fmt, missing = recognise(rows)
        if fmt is None:
            if closest is None or len(missing[0].FIELDS) - len(missing[1]) > closest[3]:
                closest = (f, missing[1], missing[0], len(missing[0].FIELDS) - len(missing[1]))
            continue
        found.append((f, fmt, rows))
    if not found:
        f, missing, fmt, _ = closest
        what = f.name if path.is_dir() else str(f)
        raise UserError(f"{what} is no benchmark eval reads: no rows with the fields of "
                        f"{fmt.TITLE} (missing: {', '.join(missing)})")
    kinds = {fmt for _, fmt, _ in found}
    if len(kinds) > 1:
        raise UserError(f"{bench} mixes benchmarks ({', '.join(k.TITLE for k in kinds)}); name "
                        "one file or folder")
    fmt = found[0][1]
    questions = [q for f, _, rows in found for q in fmt.questions(rows, f.stem)]
    return Benchmark(fmt, questions, [f for f, _, _ in found])


def recognise(rows: list):
    """(the format whose fields every row has, None), or (None, (the closest format — the
    one with the most of its fields present — and the fields it misses))."""
    closest = None
    for fmt in FORMATS:
        missing = [k for k in fmt.FIELDS if not rows or any(k not in r for r in rows)]
        if not missing:
            return fmt, None
        present = len(fmt.FIELDS) - len(missing)
        if closest is None or present > closest[2]:
            closest = (fmt, missing, present)
    return None, closest[:2]


def read_rows(path: Path) -> list:
    """The rows of a file, as dicts (anything else: no rows)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            rows = _parquet(path)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not {suffix[1:].upper()} eval can read: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return []
    return rows


def _parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow: pip install 'sfllava-mlx[eval]'") from None
    try:
        return pq.ParquetFile(path).read().to_pylist()  # read_table would import pandas
    except Exception as e:  # pyarrow's own errors: not a parquet file it can read
        raise ValueError(str(e)) from None


def download(repo_id: str) -> Path:
    """The dataset's row files (parquet, JSON, JSON Lines; not its videos) from the hub."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset",
                                      allow_patterns=[f"*{s}" for s in SUFFIXES]))
    except Exception as e:  # offline, no such dataset, gated: one line
        text = str(e).strip().splitlines()
        raise UserError(f"cannot get the dataset {repo_id} from the hub: "
                        f"{text[0] if text else type(e).__name__}") from None
