"""`sfllava batch` over several processes or Macs: MLX's own distributed engine.

`mx.distributed.init()` joins the group `mlx.launch` set up (ring or MPI backend) and is a
group of one otherwise, so one process runs the same code path. Ranks exchange bytes with
`all_gather` (lengths first, then fixed-size padded chunks) and wait for one another with
`all_sum`; nothing else crosses between them, and no file needs to be shared: the plan,
what is done and the answers all travel through the group.
"""

from __future__ import annotations

import json

import numpy as np

CHUNK = 8 << 20  # bytes per all_gather round: bounds the memory a large exchange takes


class Group:
    def __init__(self):
        import mlx.core as mx

        self._mx = mx
        self._group = mx.distributed.init()
        self.rank = self._group.rank()
        self.size = self._group.size()

    def _gather(self, x):
        mx = self._mx
        y = mx.distributed.all_gather(x, group=self._group, stream=mx.cpu)
        mx.eval(y)
        return np.array(y)

    def exchange(self, payload: bytes) -> list[bytes]:
        """Every rank's payload, in rank order, on every rank."""
        if self.size == 1:
            return [payload]
        mx = self._mx
        lengths = self._gather(mx.array([len(payload)], dtype=mx.int32)).tolist()
        longest = max(lengths)
        got = [bytearray() for _ in range(self.size)]
        for start in range(0, longest, CHUNK):
            width = min(CHUNK, longest - start)
            buf = np.zeros(width, dtype=np.uint8)
            piece = payload[start:start + width]
            buf[:len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            rows = self._gather(mx.array(buf)).reshape(self.size, width)
            for r in range(self.size):
                got[r] += rows[r].tobytes()
        return [bytes(g[:n]) for g, n in zip(got, lengths)]

    def exchange_json(self, obj) -> list:
        return [json.loads(b) for b in self.exchange(json.dumps(obj).encode())]

    def broadcast_json(self, obj):
        """Rank 0's object on every rank."""
        payload = json.dumps(obj).encode() if self.rank == 0 else b""
        return json.loads(self.exchange(payload)[0])

    def barrier(self) -> None:
        if self.size == 1:
            return
        mx = self._mx
        y = mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=self._group, stream=mx.cpu)
        mx.eval(y)
