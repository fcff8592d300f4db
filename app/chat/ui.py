"""What `sfllava chat` shows in a terminal: the header, progress, streamed answers,
status lines and the tables of /frames and /stats. Rendering only: no model logic."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..fmt import clip_notes, clock, human_bytes, human_count

HELP = """\
Ask anything about the video or picture; the conversation keeps its context.

  /help          this help
  /reset         new conversation about the same video or picture (no re-encoding)
  /frames        the frames the model sees, with timestamps
  /subs          the subtitle lines the model reads (those the frames select)
  /stats         timings, memory, context and cache
  /save FILE     write the conversation as Markdown
  /video FILE    switch to another video (or picture)
  /image FILE    switch to a picture (JPEG, PNG, WebP, HEIC)
  /part T0-T1    a new conversation about that part of the video, at the whole frame
                 budget (45:00-47:00, 45:00-, -47:00; seconds work too)
  /part          back to the whole video's conversation (kept: nothing encoded again)
  /quit          leave (Ctrl-D and Ctrl-C at the prompt leave too)

Ctrl-C while an answer is written stops it and keeps the conversation."""

STAGES = {"speech": "transcribing speech", "frames": "decoding frames",
          "vision": "encoding frames", "prefill": "prefilling prompt"}
PICTURE_STAGES = {"vision": "encoding tiles", "prefill": "prefilling prompt"}


def video_summary(path: str, clip) -> str:
    """One line of what the video (a VideoInfo) or picture (a PictureLayout) is."""
    info = clip.info
    parts = [Path(path).name]
    if info.kind == "video":
        parts += [clock(info.duration), f"{info.width}×{info.height}"]
        if info.fps:
            parts.append(f"{info.fps:.3g} fps")
    else:
        parts += [f"{info.width}×{info.height}", info.format]
    return " · ".join(parts)


def model_summary(model_info: dict) -> str:
    return (f"{model_info['name']} · {model_info['params']} parameters · "
            f"{model_info['size']} · {model_info['dtype']}")


class ChatUI:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False)

    # -- header ----------------------------------------------------------------------------
    def header(self, session, model_info: dict) -> None:
        if session.media == "image":
            return self.picture_header(session, model_info)
        video = session
        clip = video.clip
        n = len(clip.indices)
        exact = "exact" if clip.exact else "keyframes: approximate"
        lines = Text()
        lines.append("video  ", style="bold")
        lines.append(video_summary(video.path, clip) + "\n")
        if video.part is not None:
            lines.append("part   ", style="bold")
            lines.append(part_summary(video) + "\n")
        lines.append("model  ", style="bold")
        lines.append(model_summary(model_info) + "\n")
        lines.append("input  ", style="bold")
        lines.append(f"{n} frames ({exact}) → {video.visual.embeddings.shape[0]} visual tokens · "
                     f"cache {video.cache} · context {video.conversation.context_limit} tokens · "
                     f"ready in {video.open_s:.2f} s\n")
        lines.append("recipe ", style="bold")
        lines.append(recipe_summary(session))
        if session.subtitles is not None:
            lines.append("\nsubs   ", style="bold")
            lines.append(session.subtitles.summary() + " (/subs)")
        replaced = clip.replaced
        if replaced:
            lines.append("\nnote   ", style="bold yellow")
            lines.append("frames that failed to decode were replaced: "
                         + ", ".join(f"{a}→{b}" for a, b in replaced))
        self.console.print(Panel(lines, title="sfllava chat", subtitle="/help for commands",
                                 expand=False))

    def picture_header(self, opened, model_info: dict) -> None:
        from sfllava_mlx.image import describe

        config = opened.engine.model.config
        lines = Text()
        lines.append("picture ", style="bold")
        lines.append(video_summary(opened.path, opened.clip) + "\n")
        lines.append("model   ", style="bold")
        lines.append(model_summary(model_info) + "\n")
        lines.append("input   ", style="bold")
        lines.append(f"{describe(opened.clip)} → {opened.visual.embeddings.shape[0]} visual "
                     f"tokens · cache {opened.cache} · ready in {opened.open_s:.2f} s\n")
        lines.append("recipe  ", style="bold")
        family = FAMILY_NAMES.get(config.family, config.family)
        lines.append(f"{family} · image {config.image.mode}")
        self.console.print(Panel(lines, title="sfllava chat", subtitle="/help for commands",
                                 expand=False))

    # -- progress while opening a video ----------------------------------------------------
    @contextmanager
    def opening(self, path: str):
        """A `progress(stage, done, total)` callback drawing one bar per stage."""
        progress = Progress(TextColumn("{task.description:<18}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
                            transient=True)
        tasks: dict = {}
        from sfllava_mlx.image import is_picture

        labels = PICTURE_STAGES if is_picture(os.path.expanduser(path)) else STAGES

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(labels.get(stage, stage), total=total)
            progress.update(tasks[stage], completed=done, total=total)

        self.console.print(f"[dim]opening {Path(path).name}…[/dim]")
        with progress:
            yield update

    # -- an answer -------------------------------------------------------------------------
    @contextmanager
    def answer(self):
        """Stream text into a live view; when done, show it rendered as Markdown."""
        view = _AnswerView(self.console)
        live = Live(view.render(), console=self.console, refresh_per_second=12,
                    transient=True, vertical_overflow="crop")
        with live:
            view.live = live
            try:
                yield view
            finally:
                live.update(view.render())
        if view.text.strip():
            self.console.print(Markdown(view.text))

    def status(self, turn, stopped: bool, context_used: int, context_limit: int) -> None:
        t = turn.timings_s
        tps = (len(turn.tokens) - 1) / t["generate"] if len(turn.tokens) > 1 and t.get("generate") else 0.0
        parts = [f"ttft {t.get('ttft', 0.0):.2f} s", f"{turn.prompt_tokens} prompt tokens",
                 f"{len(turn.tokens)} tokens, {tps:.1f} tok/s",
                 f"peak {turn.peak_memory_gb:.2f} GB",
                 f"context {context_used}/{context_limit}"]
        if stopped:
            parts.insert(0, "stopped")
        self.console.print(Text(" · ".join(parts), style="dim"))
        if context_used > 0.9 * context_limit:
            self.console.print(f"[yellow]the context is {100 * context_used / context_limit:.0f}% "
                               f"full: /reset starts a new conversation about the same video[/yellow]")

    # -- messages and tables ---------------------------------------------------------------
    def note(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/bold red] {message}", highlight=False)

    def help(self) -> None:
        self.console.print(HELP)

    def warnings(self, warnings: list) -> None:
        for w in warnings:
            self.console.print(f"[bold yellow]warning:[/bold yellow] {w}", highlight=False)

    def subtitles(self, lines) -> None:
        from ..subtitles import listing_table

        if lines is None:
            self.note("no subtitles (--subtitles auto finds none for this video, or they "
                      "are off)")
        elif not lines.lines:
            self.note(f"{lines.track.describe()}: none of its {lines.total} lines falls on a "
                      "sampled frame")
        else:
            self.console.print(lines.summary(), highlight=False)
            self.console.print(listing_table(lines))

    def frames(self, clip) -> None:
        table = Table(title="frames the model sees", show_lines=False)
        for name in ("position", "frame", "time", "stream"):
            table.add_column(name, justify="right" if name != "stream" else "left")
        for i, (index, ts, stream) in enumerate(zip(clip.indices, clip.timestamps, clip.streams)):
            table.add_row(str(i), str(index), clock(ts), stream)
        self.console.print(table)
        for text in clip_notes(clip):
            self.note(text)

    def stats(self, rows: list[tuple[str, str]]) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        self.console.print(table)


class _AnswerView:
    """The answer while it streams: only its tail, so the live view fits the screen and
    each refresh costs the same however long the answer grows."""

    def __init__(self, console: Console):
        self.console = console
        self.text = ""
        self.live = None
        self.stopped = False

    def add(self, text: str) -> None:
        self.text += text
        if self.live is not None:
            self.live.update(self.render())

    def render(self):
        rows = max(self.console.height - 4, 3)
        tail = self.text[-rows * self.console.width * 3 // 4:]  # slack for word wrap
        body = Text("\n".join(tail.split("\n")[-rows:]))
        if self.stopped:
            return Group(body, Text("[stopped]", style="yellow"))
        return body


def part_summary(session) -> str:
    """The part a Session samples: its times and how many of the video's frames it holds."""
    text = f"{session.part.label()} (the video's own times)"
    span = session.opening.span
    if span is not None:
        text += f" · {span.count} of the video's {session.clip.info.num_frames} frames"
    return text


FAMILY_NAMES = {"sf-llava-1.5": "SF-LLaVA-1.5", "llava-onevision": "LLaVA-OneVision",
                "llava-video": "LLaVA-Video"}


def recipe_summary(session) -> str:
    """The family and recipe, and plainly when SlowFast is applied training-free."""
    config = session.engine.model.config
    family = FAMILY_NAMES.get(config.family, config.family)
    s = session.sampling
    if s.slow_every > 1:
        n_slow = len(range(0, s.num_frames, s.slow_every))
        how = f"SlowFast: {n_slow} slow + {s.num_frames - n_slow} fast frames"
    else:
        how = f"{s.num_frames} frames, pooled {s.slow_stride}x{s.slow_stride}"
    line = f"{family} · {session.options.recipe} ({how})"
    if session.training_free:
        line += f" · training-free: {family} was not trained with SlowFast"
    return line


def model_info(engine) -> dict:
    from sfllava_mlx.model import num_parameters

    model = engine.model
    path = model.path
    size = 0
    if path:
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    dtype = str(model.language_model.model.norm.weight.dtype).replace("mlx.core.", "")
    q = model.config.quantization
    if q:
        dtype += f", {q['bits']}-bit LLM"
    return {"name": engine.name, "params": human_count(num_parameters(model)),
            "size": human_bytes(size) if size else "in memory", "dtype": dtype}


def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "sfllava" / "chat_history"
