"""`sfllava bench`: statistics over the runs, the work each stage does and the share of the
machine's peak it reaches, the memory split, and the rich tables."""

from __future__ import annotations

import statistics
import sys
from typing import Optional

from ..fmt import si
from . import hardware
from .configs import Config, backend_options
from .run import STAGE_KEYS, STAGES, Run, run_once

# ---------------------------------------------------------------------------------------
# Statistics, work and shares


def summarize(values: list) -> Optional[dict]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def work_and_shares(model, sampling, runs: list[Run], stats: dict, peak: hardware.Peak,
                    kv_bits: Optional[int] = None) -> tuple[dict, dict]:
    """Per stage: the work it does (FLOP or bytes) and the share of the peak it reaches at
    its median time."""
    from sfllava_mlx.memory import kv_bytes_per_token
    from sfllava_mlx.memory import weight_bytes as parameter_bytes

    cfg = model.config
    tc = cfg.text_config
    c = runs[0].counts
    frames = sampling.num_frames
    flops_peak = peak.tflops * 1e12 if peak.tflops else None
    bw_peak = peak.bandwidth_gbs * 1e9 if peak.bandwidth_gbs else None
    llm = model.language_model
    weight_bytes = parameter_bytes(llm)
    untied = getattr(llm.args, "tie_word_embeddings", True) is False
    embed_bytes = parameter_bytes(llm.model.embed_tokens) if untied else 0
    kvpt = kv_bytes_per_token(cfg, llm.model.norm.weight.dtype.size, kv_bits)
    mean_context = c["prompt"] + c["generated"] / 2
    work = {
        "vision_tower": {"flops": frames * hardware.vision_flops_per_frame(cfg.vision)},
        "projector_pooling": {"flops": frames * hardware.projector_flops_per_frame(cfg.vision,
                                                                                   cfg.projector)
                              + hardware.pooling_flops(cfg.vision, cfg.projector.hidden_size,
                                                       sampling)},
        "prefill": {"flops": hardware.prefill_flops(tc, c["prompt"])},
        "decode": {"bytes_per_token": hardware.decode_bytes_per_token(
            tc, weight_bytes, kvpt, mean_context, embed_bytes), "mean_context": mean_context},
        "followup_ttft": {"bytes": hardware.decode_bytes_per_token(
            tc, weight_bytes, kvpt, c["followup_offset"] + c["followup_prompt"], embed_bytes),
            "flops": hardware.prefill_flops(tc, c["followup_prompt"], c["followup_offset"])},
    }
    med = {k: (v or {}).get("median") for k, v in stats.items()}
    shares = {
        "vision_tower": hardware.share(work["vision_tower"]["flops"], med["vision_tower"], flops_peak),
        "projector_pooling": hardware.share(work["projector_pooling"]["flops"],
                                            med["projector_pooling"], flops_peak),
        "prefill": hardware.share(work["prefill"]["flops"], med["prefill"], flops_peak),
        "decode": (hardware.share(work["decode"]["bytes_per_token"] * med["decode"], 1.0, bw_peak)
                   if med["decode"] else None),
        "followup_ttft": hardware.share(work["followup_ttft"]["bytes"], med["followup_ttft"], bw_peak),
    }
    return work, shares


def memory_report(model, sampling, runs: list[Run], max_tokens: int = 512, kv_bits=None) -> dict:
    """Peak memory split into weights, KV cache and the two working sets (GB), beside the
    memory plan's estimate (what `generate` checks before it starts)."""
    from sfllava_mlx.memory import plan_video
    from sfllava_mlx.memory import weight_bytes as parameter_bytes

    plan = plan_video(model, sampling, max_tokens=max_tokens, kv_bits=kv_bits)
    weights = parameter_bytes(model)
    peak_vision = max(r.memory["peak_vision"] for r in runs)
    peak_llm = max(r.memory["peak_llm"] for r in runs)
    kv = max(r.memory["kv_cache"] for r in runs)
    gb = lambda b: round(b / 1e9, 4)  # noqa: E731
    return {
        "peak": gb(max(peak_vision, peak_llm)),
        "weights": gb(weights),
        "kv_cache": gb(kv),
        "vision_working_set": gb(max(peak_vision - weights, 0)),
        "prefill_working_set": gb(max(peak_llm - weights - kv, 0)),
        "budget_weights_kv_plus_1gb": gb(weights + kv + 1e9),
        "plan_estimate": gb(plan.total),
    }


def bench_row(cfg: Config, engine, path, args, peak, progress=None, opened=None) -> dict:
    """`opened`: the video opened already (`media.open_media`), for the first run."""
    model = engine.model
    sampling = model.config.recipe(cfg.recipe, cfg.num_frames)
    options = backend_options(args, cfg)
    runs = []
    for i in range(args.warmup + args.runs):
        if progress:
            progress(cfg, i, args.warmup + args.runs)
        run = run_once(engine, path, options, prompt=args.prompt, followup=args.followup,
                       max_tokens=args.max_tokens, reopen=not args.no_reopen,
                       opened=opened if i == 0 else None)
        if i >= args.warmup:
            runs.append(run)
    notes = []
    stats = {k: summarize([r.stages[k] for r in runs]) for k in STAGE_KEYS}
    for r in runs:
        notes.extend(n for n in r.notes if n not in notes)
    if stats["cached_reopen"] is not None:
        notes = [n for n in notes if not n.startswith("cached reopen not measured")]
    work, shares = work_and_shares(model, sampling, runs, stats, peak, args.kv_bits)
    stage_sums = [sum(r.stages[k] for k in ("frame_decode", "preprocess", "vision_tower",
                                            "projector_pooling", "prefill")) for r in runs]
    ttfts = [r.stages["ttft"] for r in runs]
    c = runs[0].counts
    return {
        "config": {"model": cfg.model, "size": cfg.size, "family": model.config.family,
                   "recipe": cfg.recipe, "dtype": cfg.dtype, "q_bits": cfg.q_bits,
                   "q_group_size": args.q_group_size if cfg.q_bits else None,
                   "num_frames": sampling.num_frames, "kv_bits": args.kv_bits,
                   "vision_backend": cfg.backend,
                   "visual_tokens": c["visual"], "prompt_tokens": c["prompt"],
                   "generated_tokens": c["generated"], "followup_prompt_tokens": c["followup_prompt"],
                   "label": cfg.label()},
        "stages": {k: ({**stats[k], "unit": unit} if stats[k] else None)
                   for k, _, unit in STAGES},
        "runs": [{k: r.stages[k] for k in STAGE_KEYS} for r in runs],
        "work": work,
        "share_of_peak": shares,
        "memory_gb": memory_report(model, sampling, runs, args.max_tokens, args.kv_bits),
        "accounting": {"stage_sum_s": statistics.median(stage_sums),
                       "ttft_s": statistics.median(ttfts),
                       "unaccounted_s": statistics.median(t - s for t, s in zip(ttfts, stage_sums))},
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------
# The rich report


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _progress(console):
    if console is None:
        return None

    def show(cfg, i, total):
        console.print(f"[dim]  run {i + 1}/{total}: {cfg.label()}[/dim]")

    return show


def _fmt_work(key: str, work: dict) -> str:
    w = work.get(key)
    if not w:
        return ""
    if "flops" in w and key != "followup_ttft":
        return si(w["flops"], "FLOP")
    if "bytes_per_token" in w:
        return si(w["bytes_per_token"], "B/tok")
    if "bytes" in w:
        return si(w["bytes"], "B")
    return ""


def _fmt_rate(key: str, row: dict) -> str:
    """What the median achieves: TFLOPS or GB/s."""
    w, s = row["work"].get(key), row["stages"].get(key)
    if not w or not s or not s["median"]:
        return ""
    if key == "decode":
        return si(w["bytes_per_token"] * s["median"], "B/s")
    if key == "followup_ttft":
        return si(w["bytes"] / s["median"], "B/s")
    return si(w["flops"] / s["median"], "FLOP/s")


def print_row(console, row: dict) -> None:
    from rich.table import Table

    table = Table(title=row["config"]["label"], title_justify="left")
    for name, justify in (("stage", "left"), ("median", "right"), ("min", "right"),
                          ("max", "right"), ("work", "right"), ("achieved", "right"),
                          ("of peak", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for key, label, unit in STAGES:
        s = row["stages"].get(key)
        if s is None:
            table.add_row(label, "not measured", "", "", "", "", "")
            continue
        fmt = (lambda v: f"{v:.1f} t/s") if unit == "tok/s" else (lambda v: f"{v:.3f} s")
        share = row["share_of_peak"].get(key)
        table.add_row(label, fmt(s["median"]), fmt(s["min"]), fmt(s["max"]),
                      _fmt_work(key, row["work"]), _fmt_rate(key, row),
                      f"{100 * share:.1f}%" if share is not None else "")
    console.print(table)
    m, a = row["memory_gb"], row["accounting"]
    console.print(f"peak memory {m['peak']:.2f} GB = weights {m['weights']:.2f} + KV cache "
                  f"{m['kv_cache']:.2f} + working set (vision {m['vision_working_set']:.2f}, "
                  f"prefill {m['prefill_working_set']:.2f}) GB; budget weights + KV + 1 GB = "
                  f"{m['budget_weights_kv_plus_1gb']:.2f} GB; memory plan's estimate "
                  f"{m['plan_estimate']:.2f} GB")
    c = row["config"]
    console.print(f"{c['visual_tokens']} visual tokens, {c['prompt_tokens']} prompt tokens, "
                  f"{c['generated_tokens']} generated; stages sum to {a['stage_sum_s']:.3f} s of "
                  f"a {a['ttft_s']:.3f} s time to first token")
    for note in row["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print()


def print_summary(console, report: dict) -> None:
    from rich.table import Table

    peak = report["peak"]
    figures = ", ".join(x for x in (
        f"{peak['tflops']} TFLOPS" if peak["tflops"] else "",
        f"{peak['bandwidth_gbs']} GB/s" if peak["bandwidth_gbs"] else "") if x)
    console.print(f"peak: {figures or 'none'} ({peak['source']})")
    if len(report["rows"]) < 2:
        return
    table = Table(title="sweep", title_justify="left")
    for name in ("configuration", "ttft", "decode", "follow-up", "peak memory"):
        table.add_column(name, justify="left" if name == "configuration" else "right")
    for row in report["rows"]:
        s = row["stages"]
        dec = s.get("decode")
        table.add_row(row["config"]["label"], f"{s['ttft']['median']:.2f} s",
                      f"{dec['median']:.1f} tok/s" if dec else "-",
                      f"{s['followup_ttft']['median']:.2f} s",
                      f"{row['memory_gb']['peak']:.2f} GB")
    console.print(table)
