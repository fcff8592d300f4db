"""SlowFast-LLaVA-1.5 in MLX: chat about a local video, on device (design.md §6.2).

    from sfllava_mlx import Engine, UserError
    engine = Engine("~/models/ov-0.5b")
    chat = engine.open("holiday.mp4", recipe="slowfast")
    for chunk in chat.ask("What happens?"):
        print(chunk.text, end="", flush=True)

`Engine` and `load` import MLX and mlx-lm when first used, not with this package: reading
frames (`sfllava_mlx.frames`) stays light.
"""

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["Engine", "Session", "UserError", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Engine", "Session"):
        from . import engine

        return getattr(engine, name)
    if name == "load":
        from .model import load

        return load
    raise AttributeError(f"module 'sfllava_mlx' has no attribute {name!r}")
