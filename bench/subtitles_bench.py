"""Subtitles and speech (issue 18): what reading what is said costs, beside what it feeds.

    python -m bench.subtitles_bench [--dir DIR] [--repeats 5] [--speech-seconds 60] [--skip-film]
                                    [--film-seconds 7200] [--speech-models tiny,whisper-tiny]

1. A two-hour film's SRT (1,800 events, tags and two-line events, as films have): read and
   parsed by pysubs2 and selected by 128 sampled frames (`sfllava_mlx.subtitles`), median
   of the repeats; about how many tokens the selected lines add to the prompt (GPT-2's
   byte-level BPE: no Qwen2 tokenizer can be downloaded here).
2. The same subtitles inside a two-hour film (24 fps H.264 at 64x36 and 48 kHz AAC, made once
   with ffmpeg and kept in DIR): the embedded stream read (one pass over the file, only the
   subtitle packets decoded), the frame index the memory plan's timestamps come from, and the
   audio decoded to 16 kHz mono for speech.
   Then opening it as the engine does, side by side: `Engine.prepare` (the file opened and
   its index read, the checks, the subtitles, the memory plan with their tokens) and the
   frame reader's start (on the index the open holds), with `--subtitles off`, `auto` (the
   embedded stream) and the SRT named as a FILE.
3. Transcription per minute of audio with random-weight Whisper models (no weights can be
   downloaded here): the tests' tiny model and one at whisper-tiny's dimensions. Random
   weights never stop early and always fall back through mlx-whisper's six temperatures,
   so this is the most work per window, not what a trained model does.

`--film-seconds` and `--speech-models tiny` shorten parts 1-3 to a check of the script (the
test suite's run): a shorter film with proportionally fewer events, the tiny Whisper only.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

FILM_SECONDS = 2 * 3600
EVENTS = 1800
WHISPER = {  # --speech-models: name -> (what the report calls it, write_tiny_whisper's dims)
    "tiny": ("tests' tiny (64 wide, 1+1 layers, text context 64)", dict()),
    "whisper-tiny": ("whisper-tiny dimensions (384 wide, 4+4 layers, 6 heads, text context 448)",
                     dict(width=384, layers=4, heads=6, text_ctx=448)),
}


def film_files(d: Path, seconds: int) -> tuple[Path, Path, str]:
    """(the SRT, the MKV, what the report calls the film) of a film of `seconds`."""
    if seconds == FILM_SECONDS:
        return d / "film.srt", d / "film-2h.mkv", "two-hour"
    return d / f"film-{seconds}s.srt", d / f"film-{seconds}s.mkv", f"{seconds} s"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def film_srt(path: Path, events: int = EVENTS, seconds: int = FILM_SECONDS, seed: int = 0) -> Path:
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0, seconds - 8) for _ in range(events))
    words = "the of and to a in is you that it he was for on are as with his they at".split()

    def stamp(t: float) -> str:
        ms = round(t * 1000)
        h, ms = divmod(ms, 3_600_000)
        m, ms = divmod(ms, 60_000)
        s, ms = divmod(ms, 1000)
        return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"

    blocks = []
    for n, start in enumerate(starts, 1):
        end = start + rng.uniform(1.0, 6.0)
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
                 for _ in range(rng.choice((1, 1, 2)))]
        if rng.random() < 0.2:
            lines[0] = f"<i>{lines[0]}</i>"
        blocks.append(f"{n}\n{stamp(start)} --> {stamp(end)}\n" + "\n".join(lines) + "\n")
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def film_video(path: Path, srt: Path, seconds: int = FILM_SECONDS) -> Path:
    if path.exists():
        return path
    tmp = path.with_name("tmp-" + path.name)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size=64x36:rate=24:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=440:sample_rate=48000:duration={seconds}", "-i", str(srt),
                    "-map", "0:v", "-map", "1:a", "-map", "2", "-c:v", "libx264", "-preset",
                    "ultrafast", "-g", "240", "-c:a", "aac", "-b:a", "32k", "-c:s", "srt",
                    "-metadata:s:s:0", "language=eng", str(tmp)], check=True)
    os.replace(tmp, path)
    return path


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), out


def bench_srt(d: Path, repeats: int, seconds: int = FILM_SECONDS) -> None:
    from sfllava_mlx.frames import sample_positions
    from sfllava_mlx.subtitles import files, select
    from sfllava_mlx.subtitles.sources import resolve

    path, _, label = film_files(d, seconds)
    srt = film_srt(path, events=max(10, EVENTS * seconds // FILM_SECONDS), seconds=seconds)
    # 128 midpoint positions over a 24 fps film (two hours by default), at the frames' times.
    n = seconds * 24
    times = [i / 24 for i in sample_positions(n, 128)]
    read_s, events = timed(lambda: files.read_file(srt), repeats)
    select_s, lines = timed(lambda: select(events, times), repeats)
    whole_s, _ = timed(lambda: resolve("film.mkv", str(srt)).track.select(times), repeats)
    from sfllava_mlx.prompt import subtitle_block

    text = subtitle_block(e.text for e in lines)
    try:  # no Qwen2 tokenizer here: GPT-2's byte-level BPE, bundled with mlx-whisper
        from mlx_whisper.tokenizer import get_encoding

        tokens = f"~{len(get_encoding('gpt2').encode(text))} GPT-2 BPE"
    except ImportError:
        tokens = "n/a"
    print(f"\n## A {label} film's SRT ({len(events)} events, {srt.stat().st_size / 1e3:.0f} kB)")
    print(f"- read + parse (pysubs2): {read_s * 1e3:.1f} ms")
    print(f"- select by 128 frames: {select_s * 1e3:.3f} ms -> {len(lines)} lines, "
          f"{len(text)} characters, {tokens} tokens")
    print(f"- --subtitles FILE as the engine resolves and selects it: {whole_s * 1e3:.1f} ms")


def _subtitle_events(path, stream) -> list:
    """The embedded stream read as `--subtitles auto` reads it: on the opened video."""
    from sfllava_mlx.media import Video

    with Video.open(path) as video:
        return video.subtitle_events(stream)


def _timestamps(path) -> list:
    """The 128 frames' timestamps from the index (opening the video builds it)."""
    from sfllava_mlx.frames import sampled_timestamps
    from sfllava_mlx.media import Video

    with Video.open(path) as video:
        return sampled_timestamps(video.index, 128)


def bench_film(d: Path, repeats: int, seconds: int = FILM_SECONDS) -> None:
    from sfllava_mlx.media import Video
    from sfllava_mlx.subtitles.speech import decode_audio

    srt, mkv, label = film_files(d, seconds)
    existed = mkv.exists()
    tic = time.perf_counter()
    video = film_video(mkv, srt, seconds)
    made = "made earlier" if existed else f"made in {time.perf_counter() - tic:.0f} s"
    size = video.stat().st_size / 1e6
    with Video.open(video) as opened:
        stream = opened.text_streams[0]
    read_s, events = timed(lambda: _subtitle_events(video, stream), repeats)
    index_s, times = timed(lambda: _timestamps(video), repeats)
    audio_s, audio = timed(lambda: decode_audio(video), 1)
    print(f"\n## The same subtitles in a {label} MKV ({size:.0f} MB, 24 fps, AAC; {made})")
    print(f"- embedded SubRip stream read: {read_s * 1e3:.0f} ms ({len(events)} events)")
    print(f"- the 128 frames' timestamps from the index (a pass over the packets): "
          f"{index_s * 1e3:.0f} ms")
    print(f"- audio decoded to 16 kHz mono float32: {audio_s:.1f} s "
          f"({len(audio.samples) / 16000 / 60:.0f} min, {audio.samples.nbytes / 1e6:.0f} MB)")


def tiny_model(d: Path) -> Path:
    model = d / "tiny-model"
    if not (model / "config.json").exists():
        from sfllava_app.cli import main as sfllava
        from sfllava_convert.tiny import write_source_checkpoint

        src = write_source_checkpoint(d / "tiny-src", layout="oryx-vit", seed=0)
        assert sfllava(["convert", "--hf-path", str(src), "--mlx-path", str(model)]) == 0
    return model


def bench_prepare(d: Path, repeats: int, seconds: int = FILM_SECONDS) -> None:
    from sfllava_mlx import Engine

    engine = Engine(str(tiny_model(d)), cache_dir=d / "cache")
    srt, film, label = film_files(d, seconds)
    modes = {"off": "off", "auto (embedded stream)": "auto", "FILE (the SRT)": str(srt)}
    times: dict = {m: ([], []) for m in modes}
    # interleaved: the machine's load touches every mode alike. Each prepare opens the file
    # and reads its index afresh (sfllava_mlx.media.Video holds it; no memo across opens).
    for _ in range(repeats):
        for name, mode in modes.items():
            tic = time.perf_counter()
            opening = engine.prepare(film, subtitles=mode, cache=False)
            mid = time.perf_counter()
            opening.reader().close()  # the frame reader's start, on the open's index
            times[name][0].append(mid - tic)
            times[name][1].append(time.perf_counter() - mid)
            opening.close()
    base = sum(map(statistics.median, times["off"]))
    print(f"\n## Opening the {label} MKV, side by side (median of {repeats})")
    print("| --subtitles | prepare | frame reader start | both | vs off |")
    print("|---|---|---|---|---|")
    for name, (prep, reader) in times.items():
        a, b = statistics.median(prep), statistics.median(reader)
        print(f"| {name} | {a:.2f} s | {b:.2f} s | {a + b:.2f} s | {(a + b) / base:.2f}x |")


def bench_speech(d: Path, seconds: int, names=tuple(WHISPER)) -> None:
    import numpy as np

    from sfllava_convert.tiny.whisper import write_tiny_whisper
    from sfllava_mlx.subtitles.speech import Audio, transcribe

    rng = np.random.default_rng(0)
    t = np.arange(seconds * 16000) / 16000
    # Beeps in noise: Whisper's windows see changing sound throughout.
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 2 < 1)
               + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)
    audio = Audio(samples, 0.0)
    models = dict(WHISPER[n] for n in names)
    print(f"\n## Transcription, {seconds} s of audio, random weights (MLX CPU, float32)")
    for name, dims in models.items():
        path = d / ("whisper-" + "-".join(f"{k}{v}" for k, v in dims.items()) or "whisper")
        if not (path / "config.json").exists():
            write_tiny_whisper(path, **dims)
        transcribe(Audio(samples[:16000], 0.0), str(path))  # load the model, warm up
        tic = time.perf_counter()
        result = transcribe(audio, str(path))
        took = time.perf_counter() - tic
        print(f"- {name}: {took:.1f} s = {took / (seconds / 60):.1f} s per minute of audio "
              f"({len(result['segments'])} segments)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(Path.home() / ".cache" / "sfllava-bench" / "subtitles"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--speech-seconds", type=int, default=60)
    p.add_argument("--skip-film", action="store_true", help="no two-hour MKV (it takes minutes)")
    p.add_argument("--film-seconds", type=int, default=FILM_SECONDS,
                   help="the film's length (default two hours; shorter: a check of the script)")
    p.add_argument("--speech-models", default=",".join(WHISPER),
                   help=f"comma list of {', '.join(WHISPER)}")
    args = p.parse_args()
    if args.film_seconds < 10:
        p.error("--film-seconds must be at least 10")
    speech = args.speech_models.split(",")
    if not set(speech) <= set(WHISPER):
        p.error(f"--speech-models: choose from {', '.join(WHISPER)}")
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    print(f"# subtitles bench: {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; load {load()}")
    bench_srt(d, args.repeats, args.film_seconds)
    if not args.skip_film:
        bench_film(d, max(1, args.repeats // 2), args.film_seconds)
        bench_prepare(d, max(1, args.repeats // 2), args.film_seconds)
    if args.speech_seconds:
        bench_speech(d, args.speech_seconds, speech)
    print(f"\nload at the end: {load()}")


if __name__ == "__main__":
    main()
