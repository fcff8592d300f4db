"""What is said, when the video has no subtitles: its audio track decoded by PyAV to 16 kHz
mono float32 and transcribed on device by mlx-whisper (an optional extra:
`pip install 'sfllava-mlx[speech]'`), imported only here and only when speech is asked.

Segments come back on the audio's clock (its first sample is 0 s) and are moved to the
video's: a track that starts later than the container (an audio delay) shifts them by its
start. They are cached with the video (`cache/transcripts.py`): its content fingerprint plus
the Whisper model's identity and the settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import av

from ..errors import UserError
from ..hub import download, looks_like_repo_id
from .events import Event, in_time_order, one_line

DEFAULT_SPEECH_MODEL = "mlx-community/whisper-large-v3-turbo"  # multilingual, turbo decoder
SAMPLE_RATE = 16000  # what Whisper listens at
INSTALL = "pip install 'sfllava-mlx[speech]'"
WEIGHT_FILES = ("weights.safetensors", "weights.npz")  # mlx-whisper's model directory
SETTINGS_VERSION = 1  # bump when what is transcribed, or how, changes
SEED = 0  # of mlx-whisper's sampling, when it falls back to a temperature above 0

# progress(done, total) in seconds of audio
Progress = Callable[[int, int], None]


class SpeechError(UserError):
    """Speech cannot be transcribed: no audio track, no mlx-whisper, no such model."""


# ----------------------------------------------------------------------------------------
# What is needed, checked before anything is decoded


def require_whisper() -> None:
    try:
        found = importlib.util.find_spec("mlx_whisper") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        raise SpeechError(f"--subtitles speech needs mlx-whisper, which is not installed: {INSTALL}")


def check_model(name: str) -> None:
    """A local Whisper directory must hold mlx-whisper's files; a hub id is fetched later
    (only if nothing is cached); anything else is refused."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() or not any((path / w).is_file()
                                                             for w in WEIGHT_FILES):
            raise SpeechError(f"--speech-model {name} is not a Whisper model directory for "
                              "mlx-whisper (config.json and weights.safetensors or weights.npz)")
    elif not looks_like_repo_id(name):
        raise SpeechError(f"--speech-model {name}: no such directory, and not a hub repo id")


def model_identity(name: str) -> str:
    """What the transcript depends on: a hub id as named; a local directory by its
    config's content and its weights' size and sampled blocks."""
    path = Path(name).expanduser()
    if not path.exists():
        return f"hub:{name}"
    from ..cache.fingerprint import directory_identity

    return f"dir:{directory_identity(path)}"


def model_directory(name: str) -> str:
    """The local directory of the model (a hub id is downloaded, its weights only)."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    return str(download(name, ["config.json", *WEIGHT_FILES]))


# ----------------------------------------------------------------------------------------
# The audio


@dataclass
class Audio:
    samples: object  # np.ndarray float32 (n,), mono, SAMPLE_RATE
    offset: float  # seconds on the video's clock of the first sample


def decode_audio(path) -> Audio:
    """The first audio track, decoded and resampled by FFmpeg (PyAV's AudioResampler: the
    conversion `ffmpeg -ac 1 -ar 16000 -f f32le` makes)."""
    import numpy as np

    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise SpeechError(f"{path} has no audio track: --subtitles speech needs one")
        stream = container.streams.audio[0]
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, first = [], None
        try:
            for frame in container.decode(stream):
                if first is None and frame.pts is not None:
                    first = float(frame.pts * frame.time_base) - origin
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        except av.error.FFmpegError:
            pass  # a damaged tail: what decoded so far
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return Audio(samples, first or 0.0)


# ----------------------------------------------------------------------------------------
# Transcription


def half_precision() -> bool:
    """float16 where MLX runs on the GPU (Metal); float32 on the CPU, which has no fast
    half-precision path."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def settings() -> dict:
    return {"version": SETTINGS_VERSION, "fp16": half_precision()}


def transcribe(audio: Audio, model_dir: str, progress: Optional[Progress] = None) -> dict:
    """{"segments": [{"start", "end", "text"}...] on the video's clock, "language"}:
    mlx-whisper's defaults (language detected, temperature fallback), nothing printed."""
    require_whisper()
    whisper = importlib.import_module("mlx_whisper.transcribe")
    if len(audio.samples) == 0:
        return {"segments": [], "language": None}
    import mlx.core as mx

    try:  # loaded once per process (mlx-whisper holds it), here to name a bad model
        whisper.ModelHolder.get_model(model_dir, mx.float16 if half_precision() else mx.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpeechError(f"cannot load the Whisper model {model_dir}: {e}") from None
    with _progress_to(whisper, progress), _fixed_seed():
        result = whisper.transcribe(audio.samples, path_or_hf_repo=model_dir, verbose=None,
                                    fp16=half_precision())
    segments = [{"start": float(s["start"]) + audio.offset, "end": float(s["end"]) + audio.offset,
                 "text": one_line(s["text"])} for s in result.get("segments", [])]
    return {"segments": segments, "language": result.get("language")}


def events_of(transcript: dict) -> list[Event]:
    return in_time_order(Event(s["start"], s["end"], s["text"]) for s in transcript["segments"])


class _fixed_seed:
    """mlx-whisper's temperature fallback samples from MLX's global random state: each
    transcript runs from seed 0 (the same audio gives the same text whatever ran before:
    the cache holds what a rerun would say), and the caller's random stream goes on from a
    seed drawn from it beforehand (MLX cannot hand a random state back)."""

    def __enter__(self):
        import mlx.core as mx

        self.onward = int(mx.random.randint(0, 2**31 - 1, shape=()).item())
        mx.random.seed(SEED)
        return self

    def __exit__(self, *exc):
        import mlx.core as mx

        mx.random.seed(self.onward)
        return False


_hook = threading.Lock()  # one transcription at a time swaps mlx-whisper's progress bar


class _Bar:
    """Stands in for `tqdm.tqdm` inside mlx-whisper's transcribe, which counts mel frames
    (100 a second) on it: they reach `progress` as seconds of audio."""

    def __init__(self, progress: Progress, total: int = 0, **_):
        self.progress, self.total, self.done = progress, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.progress(self.done // 100, self.total // 100)

    def __enter__(self):
        self.progress(0, self.total // 100)
        return self

    def __exit__(self, *exc):
        return False


class _Tqdm:
    def __init__(self, progress: Progress):
        self.progress = progress

    def tqdm(self, *args, **kwargs) -> _Bar:
        return _Bar(self.progress, **kwargs)


class _progress_to:
    """mlx-whisper 0.4 reports progress only through tqdm, to the terminal: while it
    transcribes, its module's `tqdm` is ours, and its bar the caller's callback."""

    def __init__(self, module, progress: Optional[Progress]):
        self.module, self.progress = module, progress

    def __enter__(self):
        if self.progress is None:
            return self
        _hook.acquire()
        self.saved = self.module.tqdm
        self.module.tqdm = _Tqdm(self.progress)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.module.tqdm = self.saved
            _hook.release()
        return False
