"""The SigLIP-style vision tower (design.md §1.3), in MLX.

One module serves both source layouts: the converter maps SigLIP and timm names to
these. Only the blocks up to the feature layer exist, so nothing is computed that the
feature does not use.
"""

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig
from .resize import resize_grid

ACTIVATIONS = {"gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx}


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.qkv = nn.Linear(dims, 3 * dims, bias=True)  # fused: one matmul for q, k, v
        self.proj = nn.Linear(dims, dims, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dims, bias=True)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn = Attention(d, config.num_attention_heads)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=True)
        self.pos_embed = mx.zeros((config.pos_grid * config.pos_grid, d))
        self.blocks = [Block(config) for _ in range(config.feature_layer)]
        self._pos_cache = {}  # grid -> resized table; "_" keeps it out of the parameters

    def position_table(self, grid: int) -> mx.array:
        """The learned table resized to grid x grid, computed once per grid size."""
        key = (grid, self.pos_embed.dtype)
        if key not in self._pos_cache:
            g0 = self.config.pos_grid
            table = self.pos_embed.reshape(g0, g0, -1)
            table = resize_grid(table, grid, self.config.pos_interpolation)
            self._pos_cache[key] = mx.stop_gradient(table.reshape(grid * grid, -1))
        return self._pos_cache[key]

    def load_weights(self, *args, **kwargs):
        self._pos_cache.clear()  # new weights make cached tables stale
        return super().load_weights(*args, **kwargs)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, S, S, 3) normalized frames -> (B, G*G, Dv) features of the feature layer."""
        x = self.patch_embed(pixels.astype(self.pos_embed.dtype))
        B, G, _, D = x.shape
        x = x.reshape(B, G * G, D) + self.position_table(G)
        for block in self.blocks:
            x = block(x)
        return x
