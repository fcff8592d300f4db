"""Decode-loop overhead: our Session.ask against mlx-lm's stream_generate on the same LLM,
side by side in one process.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python -m bench.decode_overhead [--tokens 256] [--rounds 7] [--json out.json]

On the demo's tiny model (`make demo`: Qwen2 64 wide, 2 layers) a token's matmuls cost next
to nothing, so what is measured is the loop's own overhead per token. The model's final norm
is zeroed (every logit equal: greedy writes token 0 forever, never an end token), so every
run decodes exactly --tokens tokens; both sides start from copies of the same prefilled
prefix (system prompt + video) and the same question, alternating round by round.

- ours: `Session.ask` (mlx-lm's stream_generate inside, plus the turn's record: tokens,
  log-probabilities, timings), timed from the first token to the last, as
  `timings_s["generate"]`;
- mlx-lm: `stream_generate` on the language model with the same prompt cache, timed the
  same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sfllava_convert.tiny import Tower, write_source_checkpoint
from sfllava_convert.tiny.videos import moving_shapes, write_video


def demo_model(work: Path) -> Path:
    """The demo's tiny checkpoint, converted, with its final norm zeroed."""
    import mlx.core as mx

    from sfllava_app.cli import main as sfllava

    src, dst = work / "src", work / "mlx"
    write_source_checkpoint(src, "oryx-vit", tower=Tower(image_size=64, patch_size=8), seed=3)
    assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(dst), "--force"]) == 0
    f = dst / "model.safetensors"
    weights = mx.load(str(f))
    weights["language_model.model.norm.weight"] = mx.zeros_like(weights["language_model.model.norm.weight"])
    mx.save_safetensors(str(f), weights, {"format": "mlx"})
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    from sfllava_mlx import Engine
    from sfllava_mlx.kv import copy_prefix
    from sfllava_mlx.prompt import encode, first_turn

    work = Path(tempfile.mkdtemp(prefix="sfllava-decode-"))
    try:
        engine = Engine(demo_model(work))
        video = write_video(work / "shapes.mkv", moving_shapes(150, 320, 240), fps=25)  # the demo's
        session = engine.open(video, cache=False)
        session.prefill()
        conversation = session.conversation
        prefix = copy_prefix(conversation.cache, conversation.offset)
        question = "What is moving in this video?"
        ids = encode(engine.tokenizer, first_turn(conversation.system_prompt, question)[1])
        lm = engine.model.language_model

        def ours() -> float:
            session.conversation.restore_prefix(copy_prefix(prefix, prefix[0].offset))
            for _ in session.ask(question, max_tokens=args.tokens):
                pass
            turn = session.last_turn
            assert len(turn.tokens) == args.tokens, len(turn.tokens)
            return turn.timings_s["generate"] / (len(turn.tokens) - 1)

        def theirs() -> float:
            cache = copy_prefix(prefix, prefix[0].offset)
            first = last = None
            n = 0
            for _ in stream_generate(lm, engine.tokenizer, mx.array(ids), max_tokens=args.tokens,
                                     prompt_cache=cache, prefill_step_size=512):
                last = time.perf_counter()
                first = first or last
                n += 1
            assert n == args.tokens, n
            return (last - first) / (n - 1)

        for run in (ours, theirs):  # warm-up
            run()
        per_token = {"ours": [], "mlx-lm": []}
        for _ in range(args.rounds):
            per_token["ours"].append(ours())
            per_token["mlx-lm"].append(theirs())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in per_token.items()}
    report = {"tokens": args.tokens, "rounds": args.rounds,
              "ours_tok_s": 1 / med["ours"], "mlx_lm_tok_s": 1 / med["mlx-lm"],
              "ratio_time_per_token": med["ours"] / med["mlx-lm"],
              "ours_tok_s_all": [1 / t for t in per_token["ours"]],
              "mlx_lm_tok_s_all": [1 / t for t in per_token["mlx-lm"]]}
    print(f"decode, {args.tokens} tokens, median of {args.rounds} alternating rounds:")
    print(f"  ours (Session.ask)        {report['ours_tok_s']:8.0f} tokens/s")
    print(f"  mlx-lm (stream_generate)  {report['mlx_lm_tok_s']:8.0f} tokens/s")
    print(f"  time per token, ours / mlx-lm: {report['ratio_time_per_token']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
