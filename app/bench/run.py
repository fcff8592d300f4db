"""`sfllava bench`: one run of the whole pipeline through the library, each stage timed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sfllava_convert.tiny.videos import moving_shapes, write_video
from sfllava_mlx.errors import UserError

# (key, label, unit): the report's stages in pipeline order.
STAGES = [
    ("frame_decode", "frame decode", "s"),
    ("preprocess", "preprocess", "s"),
    ("vision_tower", "vision tower", "s"),
    ("projector_pooling", "projector+pool", "s"),
    ("prefill", "prefill", "s"),
    ("overlap", "vision ‖ prefill", "s"),  # both units busy (Core ML tower beside MLX)
    ("ttft", "TTFT", "s"),
    ("decode", "decode", "tok/s"),
    ("followup_ttft", "follow-up TTFT", "s"),
    ("cached_reopen", "cached reopen TTFT", "s"),
]
STAGE_KEYS = [k for k, _, _ in STAGES]


# ---------------------------------------------------------------------------------------
# One run of the pipeline


class TimedTower:
    """The vision tower, timed: the normalised pixels are evaluated first (preprocessing),
    then the tower alone. Called by the runtime's encode_frames as its `vision`."""

    def __init__(self, tower):
        self.tower = tower
        self.pixels_s = self.tower_s = 0.0

    def __call__(self, pixels):
        import mlx.core as mx

        tic = time.perf_counter()
        mx.eval(pixels)
        mid = time.perf_counter()
        out = self.tower(pixels)
        mx.eval(out)
        self.pixels_s += mid - tic
        self.tower_s += time.perf_counter() - mid
        return out


def stage_split(timings: dict, tower) -> dict:
    """The frame stages of a run: the runtime's `frames` and `vision` split by the timed
    tower into decode, preprocess, tower and projector + pooling (Core ML: its overlap)."""
    if tower is None:  # Core ML beside MLX: preprocessing rides with the tower
        return {"frame_decode": timings["frames"], "preprocess": 0.0,
                "vision_tower": timings["vision"], "projector_pooling": 0.0,
                "overlap": timings["overlap"]}
    return {
        # `frames` = opening the video + waiting for decoded frames + preprocessing
        "frame_decode": timings["frames"] - timings["preprocess"],
        "preprocess": timings["preprocess"] + tower.pixels_s,
        "vision_tower": tower.tower_s,
        "projector_pooling": timings["vision"] - tower.pixels_s - tower.tower_s,
        "overlap": 0.0,
    }


def _drain(chunks) -> None:
    for _ in chunks:
        pass


@dataclass
class Run:
    stages: dict  # stage -> seconds (tokens/s for decode), None when not measured
    memory: dict  # bytes
    counts: dict  # tokens: prompt, generated, follow-up, visual
    pipeline: dict  # the runtime's own timings of the first turn
    notes: list = field(default_factory=list)


def run_once(engine, path, options: dict, *, prompt: str, followup: str, max_tokens: int,
             reopen: bool = True, opened=None) -> Run:
    """A cold open (the cache emptied first) and a question, a follow-up, and (with
    `reopen`) the same video opened again from the cache, as `chat` does next time.
    `opened`: `path` opened already, taken by the cold open."""
    import mlx.core as mx

    ask = dict(max_tokens=max_tokens, temp=0.0)
    if reopen:
        engine.store.clear()
    mx.clear_cache()
    mx.reset_peak_memory()
    tower = None if options["vision_backend"] == "coreml" else TimedTower(engine.model.vision_tower)
    session = engine.open(opened if opened is not None else path, tower=tower,
                          **{**options, "cache": reopen})
    split = stage_split(session.visual.timings, tower)
    peak_vision = mx.get_peak_memory()
    mx.reset_peak_memory()
    _drain(session.ask(prompt, **ask))
    first = session.last_turn
    peak_llm = mx.get_peak_memory()
    conversation = session.conversation
    kv = sum(c.nbytes for c in conversation.cache)
    context = conversation.offset
    _drain(session.ask(followup, **ask))
    follow = session.last_turn
    t = first.timings_s
    generated = len(first.tokens)
    stages = {**split, "prefill": t["prefill"], "ttft": t["ttft"],
              "decode": (generated - 1) / t["generate"] if generated > 1 and t["generate"] else None,
              "followup_ttft": follow.timings_s["ttft"], "cached_reopen": None}
    notes = []
    if reopen:
        try:
            session.save()  # what `chat` leaves for the next session
            stages["cached_reopen"] = reopen_ttft(engine, path, options, prompt)
        except Exception as e:  # noqa: BLE001 - a cache problem must not lose the other stages
            notes.append(f"cached reopen not measured: {type(e).__name__}: {e}")
    else:
        notes.append("cached reopen not measured: --no-reopen")
    counts = {"visual": int(session.visual.embeddings.shape[0]), "prompt": first.prompt_tokens,
              "generated": generated, "followup_prompt": follow.prompt_tokens,
              "followup_offset": context, "context": conversation.offset}
    memory = {"peak_vision": peak_vision, "peak_llm": peak_llm, "kv_cache": kv}
    return Run(stages, memory, counts, dict(t), notes)


def reopen_ttft(engine, path, options: dict, prompt: str) -> float:
    """Seconds from reopening a cached video to the first token of a question."""
    session = engine.open(path, **options)
    if session.cache != "hit":
        raise RuntimeError(f"expected a cache hit, got {session.cache!r}")
    _drain(session.ask(prompt, max_tokens=1, temp=0.0))
    return session.last_turn.timings_s["ttft"]


# ---------------------------------------------------------------------------------------
# The video


def make_video(path: Path, seconds: float = 10.0, fps: float = 25.0, width: int = 640,
               height: int = 360) -> Path:
    """A generated clip (MPEG-4 part 2 in .mp4): moving shapes on a gradient."""
    try:
        return write_video(path, moving_shapes(int(seconds * fps), width, height), fps, "mp4v")
    except RuntimeError as e:
        raise UserError(f"{e}: pass --video FILE") from None
