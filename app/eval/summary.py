"""The table (design.md §9): accuracy overall and by each grouping field of the benchmark, with
counts, and the run's timings; `--json`'s object. From eval's lines, finished or partial."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

STAGES = ("frames", "vision", "prefill", "generate")


def summarize(lines: list, fmt) -> dict:
    """`{"accuracy", "answered", "missing", "by": {FIELD: {VALUE: {"accuracy", "n"}}}}`:
    lines with an `error` are `missing`, not counted in any accuracy."""
    answered = [r for r in lines if r.get("error") is None]
    by = {}
    for g in fmt.GROUPS:
        groups = defaultdict(list)
        for r in answered:
            groups[r.get(g)].append(bool(r.get("correct")))
        order = fmt.ORDER.get(g, ())
        values = sorted(groups, key=lambda v: (v not in order, order.index(v) if v in order
                                               else 0, str(v)))
        by[g] = {str(v): {"accuracy": sum(groups[v]) / len(groups[v]), "n": len(groups[v])}
                 for v in values}
    right = sum(bool(r.get("correct")) for r in answered)
    return {"accuracy": right / len(answered) if answered else None,
            "answered": len(answered), "missing": len(lines) - len(answered), "by": by}


def timings(lines: list) -> dict:
    """Seconds spent in each stage over the answered lines (critical-path shares)."""
    total = dict.fromkeys(STAGES, 0.0)
    for r in lines:
        for s in STAGES:
            total[s] += (r.get("timings_s") or {}).get(s) or 0.0
    return total


def show(lines: list, fmt, summary: dict, as_json: bool) -> None:
    """The rich table (on stderr with --json: stdout then carries only the JSON line)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=as_json, highlight=False)
    table = Table(title=f"{fmt.TITLE}: {summary['answered']} questions answered"
                  + (f", {summary['missing']} missing (errors)" if summary["missing"] else ""))
    table.add_column("group")
    table.add_column("value")
    table.add_column("accuracy", justify="right")
    table.add_column("n", justify="right")
    table.add_row("overall", "", _percent(summary["accuracy"]), str(summary["answered"]))
    for field, values in summary["by"].items():
        table.add_section()
        for k, (value, cell) in enumerate(values.items()):
            table.add_row(field if k == 0 else "", value, _percent(cell["accuracy"]),
                          str(cell["n"]))
    spent = timings([r for r in lines if r.get("error") is None])
    n = max(summary["answered"], 1)
    table.caption = ("timings: " + ", ".join(f"{s} {spent[s]:.1f} s" for s in STAGES)
                     + f"; {sum(spent.values()) / n:.2f} s a question")
    console.print(table)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_of_file(path: str, as_json: bool) -> int:
    """`sfllava eval --summary FILE.jsonl`: the table of its lines, and of the part files a
    stopped run left beside it; no model."""
    from pathlib import Path

    from sfllava_mlx.errors import UserError

    from ..batch import results
    from .source import by_name

    out = Path(path)
    if not out.is_file():
        raise UserError(f"--summary {path}: no such file")
    records = results.read(out).records
    for part in results.part_files(out).values():
        records += results.read(part).records
    lines, seen = [], set()
    for r in records:  # a part file's line may also be in --out already
        k = results.record_key(r)
        if r.get("question_id") is not None and k not in seen:
            seen.add(k)
            lines.append(r)
    if not lines:
        raise UserError(f"{path} holds no line of sfllava eval")
    names = list(dict.fromkeys(r.get("benchmark") for r in lines))
    try:
        formats = [by_name(n) for n in names]
    except StopIteration:
        raise UserError(f"{path}: lines of an unknown benchmark {names}") from None
    for fmt in formats:
        mine = [r for r in lines if r.get("benchmark") == fmt.NAME]
        show(mine, fmt, summarize(mine, fmt), as_json)
    return 0
