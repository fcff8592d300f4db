"""What the machine gives: the memory MLX may use, from the cheapest source that knows.

No MLX import at module level: reading frames checks memory too, and must stay light.
"""

from __future__ import annotations

import os
import sys

GB = 1e9


def memory_limit() -> tuple[int, str]:
    """(bytes, where the figure comes from). $SFLLAVA_MEMORY_LIMIT_GB wins (tests, shared
    machines); on a Mac, Metal's recommended working set; on a discrete GPU its memory;
    elsewhere the memory MLX holds now plus what the system still has available."""
    forced = os.environ.get("SFLLAVA_MEMORY_LIMIT_GB")
    if forced:
        try:
            return int(float(forced) * GB), "SFLLAVA_MEMORY_LIMIT_GB"
        except ValueError:
            pass
    import mlx.core as mx

    info = mx.device_info()
    working_set = info.get("max_recommended_working_set_size")
    if working_set:
        return int(working_set), "Metal's recommended working set"
    if mx.default_device() == mx.gpu and info.get("total_memory"):  # a discrete GPU (CUDA)
        return int(info["total_memory"]), f"{info.get('device_name', 'the GPU')}'s memory"
    available = available_memory()
    if available:
        return available + mx.get_active_memory(), "available memory"
    return physical_memory(), "physical memory"


def available_memory() -> int:
    """Linux's MemAvailable, in bytes; 0 where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if sys.platform == "darwin":
        import subprocess  # here: reading frames checks memory and must start fast

        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    return 0
