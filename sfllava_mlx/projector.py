"""The `mlp2x_gelu` projector (design.md §1.4): vision features into the LLM's space."""

import mlx.core as mx
import mlx.nn as nn

from .config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        if config.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported projector type {config.projector_type!r}")
        self.linear_1 = nn.Linear(config.input_size, config.hidden_size, bias=True)
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))
