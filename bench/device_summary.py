"""Summarise bench/device_run.sh's results.jsonl: one line per configuration.

    python -m bench.device_summary OUT/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys


def med(stages: dict, key: str):
    s = stages.get(key)
    return None if not s else s["median"]


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(path: str) -> int:
    lines = [json.loads(line) for line in open(path) if line.strip()]
    machine = None
    cols = ("run", "model", "recipe", "dtype", "bits", "frames", "vis tok", "prompt",
            "TTFT s", "frames s", "prep s", "tower s", "proj s", "prefill s", "decode tok/s",
            "follow s", "reopen s", "peak GB", "weights GB", "KV GB",
            "tower %", "prefill %", "decode %")
    print(" | ".join(cols))
    for r in lines:
        if r.get("skipped"):
            print(f"{r['name']} | skipped (budget)")
            continue
        rep = r.get("report") or {}
        if not rep.get("rows"):
            print(f"{r['name']} | rc={r.get('rc')} wall={r.get('wall_s')}s | "
                  f"{rep.get('error', 'no rows')}")
            continue
        machine = machine or rep.get("machine")
        for row in rep["rows"]:
            c, s, m, sh = row["config"], row["stages"], row["memory_gb"], row.get("share_of_peak", {})
            pct = lambda k, sh=sh: "-" if sh.get(k) is None else f"{100 * sh[k]:.0f}"
            print(" | ".join(str(x) for x in (
                r["name"], c.get("size"), c.get("recipe") or "-", c.get("dtype"),
                c.get("q_bits") or 16, c.get("num_frames"), c.get("visual_tokens"),
                c.get("prompt_tokens"),
                fmt(med(s, "ttft")), fmt(med(s, "frame_decode")), fmt(med(s, "preprocess")),
                fmt(med(s, "vision_tower"), ".3f"), fmt(med(s, "projector_pooling"), ".3f"),
                fmt(med(s, "prefill"), ".3f"), fmt(med(s, "decode"), ".1f"),
                fmt(med(s, "followup_ttft"), ".3f"), fmt(med(s, "cached_reopen"), ".3f"),
                fmt(m.get("peak")), fmt(m.get("weights")), fmt(m.get("kv_cache")),
                pct("vision_tower"), pct("prefill"), pct("decode"))))
        print(f"  ({r['name']}: rc={r['rc']}, wall {r['wall_s']} s, "
              f"ttft min/max {fmt(s['ttft']['min'])}/{fmt(s['ttft']['max'])} s)")
    if machine:
        print("machine:", json.dumps(machine))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.jsonl written by bench/device_run.sh")
    sys.exit(main(ap.parse_args().results))
