"""What the server says on stderr: one line an event, flushed at once."""

import sys


def log(message: str) -> None:
    print(f"sfllava serve: {message}", file=sys.stderr, flush=True)
