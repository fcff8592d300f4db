"""An independent PyTorch reference of the SF-LLaVA-1.5 pipeline (design.md §1), for tests.

Written from design.md §1/§5.2 and the *source* checkpoint (Hugging Face names), never from the
MLX code: frames come from one sequential OpenCV decode, the SigLIP tower is
`transformers.SiglipVisionModel`, the Oryx tower is a timm-named ViT written below, the
LLM is `transformers.Qwen2ForCausalLM`. Everything runs in float32.

Each stage is a method so tests can compare stage by stage, and each of the usual
porting mistakes can be switched on through `Mistakes` to prove a fixture catches it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TOWER_PREFIX = "model.vision_tower.vision_tower."
SIGLIP_PREFIX = TOWER_PREFIX + "vision_model."
PROJECTOR_PREFIX = "model.mm_projector."

# design.md §5.2: the SigLIP so400m-patch14-384 defaults and the Oryx-ViT defaults.
SIGLIP_DEFAULTS = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)
ORYX_DEFAULTS = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
)


@dataclass
class Mistakes:
    """The usual porting mistakes, each off by default."""

    bgr: bool = False  # feed OpenCV's BGR frames as if they were RGB
    index_offset: int = 0  # shift every sampled frame index (clamped to the video)
    feature_layer: Optional[int] = None  # take this hidden state instead of the config's
    pool_before_projector: bool = False  # SlowFast-pool vision features, then project
    swap_streams: bool = False  # emit the fast block before the slow block
    swap_strides: bool = False  # pool slow frames with the fast stride and vice versa


# ---------------------------------------------------------------------------------------
# Source checkpoint
# ---------------------------------------------------------------------------------------


def load_source_tensors(source_dir: Path) -> dict[str, torch.Tensor]:
    source_dir = Path(source_dir)
    index = source_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(source_dir / name)))
    return {k: v.float() for k, v in tensors.items()}


def detect_layout(tensors: dict) -> str:
    if any(k.startswith(SIGLIP_PREFIX) for k in tensors):
        return "llava-siglip"
    if any(k.startswith(TOWER_PREFIX + "blocks.") for k in tensors):
        return "oryx-vit"
    raise ValueError("no vision tower tensors found")


def sub_dict(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------
# Stage 1-2: frames and preprocessing (OpenCV, sequential decode)
# ---------------------------------------------------------------------------------------


def sample_indices(n: int, num_frames: int) -> list[int]:
    """design.md §1.1: idx_i = floor((i + 0.5) * N / T), in exact integer arithmetic."""
    return [((2 * i + 1) * n) // (2 * num_frames) for i in range(num_frames)]


def decode_all(video: Path) -> list[np.ndarray]:
    """Every frame of the video, in order, as OpenCV gives them (BGR, upright)."""
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    if not frames:
        raise ValueError(f"no frames decoded from {video}")
    return frames


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    grows = h < size and w < size
    interp = cv2.INTER_CUBIC if grows else cv2.INTER_AREA
    return cv2.resize(frame, (size, size), interpolation=interp)


def normalize(frames_rgb: Sequence[np.ndarray], mean, std) -> torch.Tensor:
    """uint8 (H, W, 3) frames at S x S -> (T, 3, S, S) float32."""
    x = torch.from_numpy(np.stack(frames_rgb)).float() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------
# Stage 3: the Oryx-style ViT with timm names
# ---------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, dims: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dims, kernel_size=patch, stride=patch, bias=True)


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dims, 3 * dims)
        self.proj = nn.Linear(dims, dims)

    def forward(self, x):
        B, N, C = x.shape
        hd = C // self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * hd**-0.5
        out = att.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.approximate = "tanh" if "tanh" in act else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, dims, heads, hidden, act, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=eps)
        self.attn = Attention(dims, heads)
        self.norm2 = nn.LayerNorm(dims, eps=eps)
        self.mlp = Mlp(dims, hidden, act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OryxViT(nn.Module):
    def __init__(self, vc: dict, pos_grid: int):
        super().__init__()
        d = vc["hidden_size"]
        self.patch_size = vc["patch_size"]
        self.pos_grid = pos_grid
        self.patch_embed = PatchEmbed(d, self.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid, d))
        self.blocks = nn.ModuleList(
            Block(d, vc["num_attention_heads"], vc["intermediate_size"], vc["hidden_act"],
                  vc["layer_norm_eps"])
            for _ in range(vc["num_hidden_layers"])
        )

    def position_table(self, grid: int) -> torch.Tensor:
        pos = self.pos_embed
        if grid == self.pos_grid:
            return pos
        d = pos.shape[-1]
        pos = pos.reshape(1, self.pos_grid, self.pos_grid, d).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(grid, grid), mode="bilinear", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d)

    def forward(self, pixels) -> list[torch.Tensor]:
        """(B, 3, S, S) -> hidden states in HF indexing: [embeddings, block 1, ...]."""
        x = self.patch_embed.proj(pixels)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2) + self.position_table(grid)
        states = [x]
        for blk in self.blocks:
            x = blk(x)
            states.append(x)
        return states


# ---------------------------------------------------------------------------------------
# The whole pipeline
# ---------------------------------------------------------------------------------------


@dataclass
class Answer:
    tokens: list[int]
    logprobs: list[float]
    text: str
    margins: list[float]  # top-1 minus top-2 logit at each step: how decisive greedy was


class Reference:
    """The SF-LLaVA-1.5 pipeline in torch, read straight from a source checkpoint.

    `image_size` overrides S (the frame size) to exercise the position-table resize;
    the sampling fields mirror design.md §1 and default to it.
    """

    def __init__(
        self,
        source_dir,
        *,
        image_size: Optional[int] = None,
        num_frames: int = 128,
        slow_every: int = 4,
        slow_stride: int = 2,
        fast_stride: int = 4,
        mistakes: Optional[Mistakes] = None,
    ):
        self.source_dir = Path(source_dir)
        self.config = json.loads((self.source_dir / "config.json").read_text())
        self.tensors = load_source_tensors(self.source_dir)
        self.layout = detect_layout(self.tensors)
        self.mistakes = mistakes or Mistakes()
        self.num_frames = num_frames
        self.slow_every = slow_every
        self.slow_stride = slow_stride
        self.fast_stride = fast_stride

        self._read_preprocessor()
        self._build_tower()
        self.image_size = image_size or self.vision_config["image_size"]
        self._build_projector()
        self._build_llm()

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.source_dir))
        ends = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.end_ids = {i for i in ends if isinstance(i, int) and i != self.tokenizer.unk_token_id}

    # -- checkpoint ------------------------------------------------------------------------

    def _read_preprocessor(self):
        mean, std = [0.5] * 3, [0.5] * 3
        path = self.source_dir / "preprocessor_config.json"
        if path.exists():
            pre = json.loads(path.read_text())
            mean = pre.get("image_mean", mean)
            std = pre.get("image_std", std)
        self.image_mean, self.image_std = list(mean), list(std)

    def _build_tower(self):
        defaults = SIGLIP_DEFAULTS if self.layout == "llava-siglip" else ORYX_DEFAULTS
        vc = dict(defaults)
        vc.update({k: v for k, v in (self.config.get("vision_config") or {}).items() if k in defaults})
        self.vision_config = vc
        layers = vc["num_hidden_layers"]
        # LLaVA's usual feature layer for SigLIP is the penultimate block; Oryx uses the last.
        default_layer = -2 if self.layout == "llava-siglip" else -1
        layer = self.config.get("mm_vision_select_layer")
        layer = default_layer if layer is None else int(layer)
        if self.mistakes.feature_layer is not None:
            layer = self.mistakes.feature_layer
        self.feature_layer = layer if layer >= 0 else layers + 1 + layer

        if self.layout == "llava-siglip":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            weights = sub_dict(self.tensors, SIGLIP_PREFIX)
            table = weights["embeddings.position_embedding.weight"]
            self.pos_grid = math.isqrt(table.shape[0])
            # The position table has G0*G0 rows, so the SigLIP config's image size is G0*P;
            # other frame sizes go through transformers' own bicubic resize of the table.
            cfg = SiglipVisionConfig(
                hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
                num_hidden_layers=layers, num_attention_heads=vc["num_attention_heads"],
                image_size=self.pos_grid * vc["patch_size"], patch_size=vc["patch_size"],
                hidden_act=vc["hidden_act"], layer_norm_eps=vc["layer_norm_eps"],
                num_channels=3, vision_use_head=False,
            )
            cfg._attn_implementation = "eager"
            tower = SiglipVisionModel(cfg)
            weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
            missing, unexpected = (getattr(tower, "vision_model", tower)).load_state_dict(weights, strict=False)
            # Only blocks above the feature layer and the post-LayerNorm may be absent.
            bad = [k for k in missing if not self._droppable_siglip(k)]
            if bad or unexpected:
                raise ValueError(f"siglip tower: missing {bad}, unexpected {unexpected}")
        else:
            weights = sub_dict(self.tensors, TOWER_PREFIX)
            self.pos_grid = math.isqrt(weights["pos_embed"].shape[1])
            tower = OryxViT(vc, self.pos_grid)
            weights = {k: v for k, v in weights.items() if not k.startswith(("norm.", "head", "fc_norm"))}
            missing, unexpected = tower.load_state_dict(weights, strict=False)
            bad = [k for k in missing if not self._droppable_block(k)]
            if bad or unexpected:
                raise ValueError(f"oryx tower: missing {bad}, unexpected {unexpected}")
        self.tower = tower.eval()

    def _droppable_block(self, key: str) -> bool:
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in ("blocks", "layers") and parts[i + 1].isdigit():
                return int(parts[i + 1]) >= self.feature_layer
        return False

    def _droppable_siglip(self, key: str) -> bool:
        return key.startswith("post_layernorm.") or self._droppable_block(key)

    def _build_projector(self):
        w = sub_dict(self.tensors, PROJECTOR_PREFIX)
        self.projector = nn.Sequential(
            nn.Linear(w["0.weight"].shape[1], w["0.weight"].shape[0]),
            nn.GELU(),  # exact
            nn.Linear(w["2.weight"].shape[1], w["2.weight"].shape[0]),
        )
        self.projector.load_state_dict(w, strict=True)
        self.projector.eval()

    def _build_llm(self):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        c = dict(self.config)
        known = set(Qwen2Config.__annotations__)  # the Qwen2 fields only
        if not c.get("rope_parameters"):
            c["rope_parameters"] = {"rope_type": "default", "rope_theta": c.get("rope_theta", 10000.0)}
        c = {k: v for k, v in c.items() if k in known}
        cfg = Qwen2Config(**c)
        cfg._attn_implementation = "eager"
        llm = Qwen2ForCausalLM(cfg)
        weights = {
            k: v for k, v in self.tensors.items()
            if (k.startswith("model.") and not k.startswith(("model.mm_projector.", "model.vision_tower.")))
            or k == "lm_head.weight"
        }
        missing, unexpected = llm.load_state_dict(weights, strict=False)
        if cfg.tie_word_embeddings:
            llm.lm_head.weight = llm.model.embed_tokens.weight
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"llm: missing {missing}, unexpected {unexpected}")
        # float64: the sharpened fixture amplifies float32 rounding, and float32 matmuls in the
        # shared test process once moved a logprob by 3e-4; float64 is the exact answer the
        # float32 MLX port is held to.
        self.llm = llm.double().eval()

    # -- stages ----------------------------------------------------------------------------

    @property
    def grid(self) -> int:
        return self.image_size // self.vision_config["patch_size"]

    def frame_indices(self, n: int) -> list[int]:
        idx = sample_indices(n, self.num_frames)
        off = self.mistakes.index_offset
        return [min(max(i + off, 0), n - 1) for i in idx]

    def read_frames(self, video) -> tuple[list[np.ndarray], list[int]]:
        """The sampled frames as RGB uint8 at the video's resolution, and their indices."""
        all_frames = decode_all(Path(video))
        idx = self.frame_indices(len(all_frames))
        frames = [all_frames[i] for i in idx]
        if not self.mistakes.bgr:
            frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames]
        return frames, idx

    def preprocess(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 frames -> (T, 3, S, S) float32 pixels."""
        return normalize([resize_frame(f, self.image_size) for f in frames], self.image_mean, self.image_std)

    @torch.no_grad()
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) -> (T, G*G, Dv), the hidden state at the feature layer (no post-LN)."""
        if self.layout == "llava-siglip":
            out = self.tower(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
            states = out.hidden_states
        else:
            states = self.tower(pixels)
        return states[self.feature_layer]

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)

    def is_slow(self, position: int) -> bool:
        return position % self.slow_every == 0

    @staticmethod
    def pool_grid(x: torch.Tensor, stride: int) -> torch.Tensor:
        """(T, G, G, C) -> (T, g, g, C): average pool, or bilinear resize when G % stride."""
        x = x.permute(0, 3, 1, 2)
        g = x.shape[-1]
        if g % stride == 0:
            y = F.avg_pool2d(x, kernel_size=stride, stride=stride)
        else:
            size = -(-g // stride)
            y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return y.permute(0, 2, 3, 1)

    @torch.no_grad()
    def slowfast(self, grid: torch.Tensor) -> torch.Tensor:
        """(T, G, G, C) -> (Nv, C): slow block then fast block, each (t, h, w) ordered."""
        T = grid.shape[0]
        slow_pos = [i for i in range(T) if self.is_slow(i)]
        fast_pos = [i for i in range(T) if not self.is_slow(i)]
        s_stride, f_stride = self.slow_stride, self.fast_stride
        if self.mistakes.swap_strides:
            s_stride, f_stride = f_stride, s_stride
        blocks = []
        for pos, stride in ((slow_pos, s_stride), (fast_pos, f_stride)):
            if pos:
                pooled = self.pool_grid(grid[pos], stride)
                blocks.append(pooled.reshape(-1, grid.shape[-1]))
        if self.mistakes.swap_streams:
            blocks = blocks[::-1]
        return torch.cat(blocks, dim=0)

    @torch.no_grad()
    def visual_tokens_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vision_features(pixels)
        T, N, Dv = feats.shape
        g = math.isqrt(N)
        grid = feats.reshape(T, g, g, Dv)
        if self.mistakes.pool_before_projector:
            return self.project(self.slowfast(grid))
        return self.slowfast(self.project(grid))

    def visual_tokens(self, video) -> torch.Tensor:
        frames, _ = self.read_frames(video)
        return self.visual_tokens_from_pixels(self.preprocess(frames))

    def num_visual_tokens(self) -> int:
        g = self.grid
        n_slow = sum(self.is_slow(i) for i in range(self.num_frames))
        n_fast = self.num_frames - n_slow
        return n_slow * (-(-g // self.slow_stride)) ** 2 + n_fast * (-(-g // self.fast_stride)) ** 2

    # -- prompt and LLM --------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_pieces(self, question: str, system_prompt: Optional[str] = None) -> tuple[list[int], list[int]]:
        """design.md §1.7: the ChatML text before and after `<image>`, each tokenized on its own."""
        system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        before = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        after = f"\n{question}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode_text(before), self.encode_text(after)

    def followup_ids(self, question: str) -> list[int]:
        return self.encode_text(f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")

    @torch.no_grad()
    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.llm.model.embed_tokens(torch.tensor(list(ids), dtype=torch.long))

    @torch.no_grad()
    def prompt_embeddings(self, visual: torch.Tensor, question: str, system_prompt=None) -> torch.Tensor:
        before, after = self.prompt_pieces(question, system_prompt)
        return torch.cat([self.embed(before), visual.double(), self.embed(after)], dim=0)

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(L, D) -> (L, V) float32 logits."""
        return self.llm(inputs_embeds=embeddings[None]).logits[0].float()

    @torch.no_grad()
    def greedy(self, embeddings: torch.Tensor, max_tokens: int) -> Answer:
        """Greedy decoding from prompt embeddings; the end token stops and is not returned."""
        tokens, logprobs, margins = [], [], []
        out = self.llm(inputs_embeds=embeddings[None], use_cache=True)
        for _ in range(max_tokens):
            lp = torch.log_softmax(out.logits[0, -1], dim=-1)
            top = lp.topk(2).values
            margins.append(float(top[0] - top[1]))
            tok = int(lp.argmax())
            if tok in self.end_ids:
                break
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            out = self.llm(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        return Answer(tokens, logprobs, self.tokenizer.decode(tokens), margins)

    @torch.no_grad()
    def chat(self, visual: torch.Tensor, questions: Sequence[str], max_tokens: int,
             system_prompt=None) -> list[Answer]:
        """Several turns about one video; each turn re-runs the whole conversation from scratch."""
        answers = []
        emb = self.prompt_embeddings(visual, questions[0], system_prompt)
        for n, q in enumerate(questions):
            if n:
                emb = torch.cat([emb, self.embed(answers[-1].tokens + self.followup_ids(q))])
            answers.append(self.greedy(emb, max_tokens))
        return answers

    def answer(self, video, question: str, max_tokens: int, system_prompt=None) -> Answer:
        visual = self.visual_tokens(video)
        return self.greedy(self.prompt_embeddings(visual, question, system_prompt), max_tokens)
