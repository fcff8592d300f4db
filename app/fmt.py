"""How the commands write numbers: clocks, byte sizes, counts."""

from __future__ import annotations


def clock(seconds: float, digits: int = 2) -> str:
    """1:02:03.45 / 2:03.45 style timestamps, `digits` decimals of the seconds."""
    seconds = max(float(seconds or 0.0), 0.0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    sec = f"{s:0{3 + digits}.{digits}f}"
    return f"{int(h)}:{int(m):02d}:{sec}" if h else f"{int(m)}:{sec}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def count(n: int, what: str) -> str:
    """'1 video', '3 videos'."""
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
