"""LLaVA-OneVision / LLaVA-Video for the tests of issue #9: tiny checkpoints built with
transformers' `LlavaOnevisionForConditionalGeneration`, written in each naming a real
checkpoint of the family has, and two torch references that never touch the MLX code:

- `HFVideoReference`: transformers' own video path (`pixel_values_videos`: its SigLIP tower,
  projector, `apply_pooling`, `image_newline`, placeholder splice), fed the frames design.md §1.1/§1.2
  picks. This is what the OneVision native recipe must reproduce exactly.
- `RecipeReference`: design.md §2.1 written out in torch ops (positions, slow/fast streams,
  `F.interpolate` / `F.avg_pool2d`, newline rules, ChatML splice) on the same model's
  submodules: the reference for the slowfast recipe and for LLaVA-Video's recipes, and the
  place where each usual mistake can be switched on (`Mistakes`).

Both run a float64 copy of the model (the sharpened fixture amplifies float32 rounding; float64
is the exact answer the float32 MLX port is held to, as in tests/reference.py).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tests.reference import DEFAULT_SYSTEM_PROMPT, Answer, normalize, resize_frame

# Tiny shapes. 28 px frames, patch 4 -> G = 7, odd like the real 27 (384 px, patch 14), so
# bilinear pooling (7 -> 4) and average pooling (7 -> 3) differ, and the fast stride 4 gives 2
# (bilinear) or 1 (average). OneVision native: 32 frames x 4 x 4 + 1 newline = 513 tokens.
TINY_OV = dict(image_size=28, patch_size=4, vision_hidden=32, vision_layers=3, vision_heads=2,
               vision_mlp=64, hidden=64, llm_layers=2, heads=4, kv_heads=2, intermediate=128)
TOKENIZER_VOCAB = 640  # convert.tiny.write_tokenizer: 637 BPE ids + 3 specials
LLM_VOCAB = 700  # rows past the tokenizer: padding, kept by the converter
IMAGE_TOKEN = 698
VIDEO_TOKEN = 699  # never produced by the tokenizer, as in the real checkpoints
SEED = 0
# Video preprocessor values (llava-hf checkpoints carry video_preprocessor_config.json), unlike
# the image processor's, so the test sees which one the converter took.
VIDEO_MEAN, VIDEO_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]

# Rescaled source tensors (see tests/conftest.py `sharpen`): peaked attention in the tower and
# the LLM, loud visual tokens, a newline vector as loud as a visual token, peaked next-token
# distributions. Patterns are matched against transformers' in-memory names.
SHARPEN_OV = {
    r"self_attn\.(q|k)_proj\.weight$": 6.0,
    r"self_attn\.(v|o)_proj\.weight$": 4.0,
    r"embed_tokens\.weight$": 10.0,
    r"^lm_head\.weight$": 10.0,  # untied models only (tied: the same tensor as embed_tokens)
    r"multi_modal_projector\.linear_2\.weight$": 4.0,
    r"image_newline$": 20.0,
}

INIT_STD = 0.05

# design.md §2.1 recipes as plain dicts (the fields of the converted config's `recipes`).
ONEVISION_NATIVE = dict(num_frames=32, frame_positions="linspace", slow_every=1, slow_stride=2,
                        fast_stride=2, pool_mode="bilinear", newline="one_token")


def slowfast_recipe(native: dict) -> dict:
    return dict(num_frames=128, frame_positions="midpoint", slow_every=4, slow_stride=2,
                fast_stride=4, pool_mode=native["pool_mode"], newline=native["newline"])


def llava_video_native(pool_mode: str = "average", newline: str = "grid") -> dict:
    return dict(num_frames=64, frame_positions="linspace", slow_every=1, slow_stride=2,
                fast_stride=2, pool_mode=pool_mode, newline=newline)


# ---------------------------------------------------------------------------------------
# The tiny transformers model
# ---------------------------------------------------------------------------------------


def pinpoints() -> list:
    """OneVision's any-resolution grid (1..6 x 1..6 tiles) for the tiny tower's 28 px tile."""
    t = TINY_OV["image_size"]
    return [[i * t, j * t] for i in range(1, 7) for j in range(1, 7)]


def build_model(*, tied: bool = True, feature_layer: int = -1, seed: int = SEED,
                sharpen: bool = True, vocab: int = LLM_VOCAB):
    """A random LlavaOnevisionForConditionalGeneration in float32, eval mode."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    t = TINY_OV
    vc = SiglipVisionConfig(hidden_size=t["vision_hidden"], intermediate_size=t["vision_mlp"],
                            num_hidden_layers=t["vision_layers"], num_attention_heads=t["vision_heads"],
                            image_size=t["image_size"], patch_size=t["patch_size"],
                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
    tc = Qwen2Config(hidden_size=t["hidden"], num_hidden_layers=t["llm_layers"],
                     num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
                     intermediate_size=t["intermediate"], vocab_size=vocab, tie_word_embeddings=tied,
                     max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                    "rope_theta": 1000000.0})
    cfg = LlavaOnevisionConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                               vision_feature_layer=feature_layer,
                               vision_feature_select_strategy="full",
                               image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                               tie_word_embeddings=tied, image_grid_pinpoints=pinpoints())
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    with torch.no_grad():
        # convert.tiny's initialiser-like values (what SHARPEN was tuned on), not transformers'
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.02 * x)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * x)
            else:
                p.copy_(INIT_STD * x)
        if sharpen:
            params = dict(model.named_parameters(remove_duplicate=False))
            done = set()
            for pattern, factor in SHARPEN_OV.items():
                for name, p in params.items():
                    if re.search(pattern, name) and id(p) not in done:
                        p.mul_(factor)
                        done.add(id(p))
    return model.eval()


def float64_copy(model):
    m = copy.deepcopy(model).double().eval()
    m.config._attn_implementation = "eager"
    for sub in m.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    return m


def state_dict(model) -> dict[str, torch.Tensor]:
    """transformers' in-memory names (model.language_model.*, lm_head.weight, ...), each
    tensor once (a tied lm_head is left out, as safetensors writers do)."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen[t.data_ptr()] = name
        out[name] = t.detach().clone().contiguous().float()
    return out


# ---------------------------------------------------------------------------------------
# Writing a checkpoint in each naming
# ---------------------------------------------------------------------------------------

NAMINGS = ("save_pretrained", "hub-2024", "in-memory", "llava-next")


def _save(tensors: dict, dst: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _preprocessors(dst: Path) -> None:
    size = TINY_OV["image_size"]
    _write_json(dst / "preprocessor_config.json", {
        "image_processor_type": "LlavaOnevisionImageProcessor", "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}})
    _write_json(dst / "video_preprocessor_config.json", {
        "video_processor_type": "LlavaOnevisionVideoProcessor", "image_mean": VIDEO_MEAN,
        "image_std": VIDEO_STD, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size}})


def hf_to_hub_2024(name: str) -> str:
    """save_pretrained names -> the 2024 llava-hf hub files' names."""
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def write_checkpoint(model, dst: Path, naming: str, *, config_changes: Optional[dict] = None,
                     llava_next: Optional[dict] = None, drop_last_block: bool = False) -> Path:
    """Write `model` as a source checkpoint in `naming` (NAMINGS) to `dst`; return dst.

    save_pretrained: transformers 5's own files (language_model.model.*, vision_tower.*).
    hub-2024: the same with the tower under vision_tower.vision_model.* (2024 hub files).
    in-memory: transformers >= 4.52 in-memory names (model.language_model.*, lm_head.weight).
    llava-next: the LLaVA-NeXT code base (lmms-lab): LLM under model.*, model.mm_projector.0/2,
      model.vision_tower.vision_tower.vision_model.*, model.image_newline and a flat config;
      `llava_next` adds/overrides config fields (mm_newline_position, mm_spatial_pool_mode, ...);
      drop_last_block: the file holds one block fewer than its named tower (LLaVA-NeXT's SigLIP
      builder) and says mm_vision_select_layer -2.
    Every checkpoint gets the tiny Qwen2 tokenizer and preprocessor files.
    """
    from sfllava_convert.tiny import write_tokenizer

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    if naming in ("save_pretrained", "hub-2024"):
        model.save_pretrained(str(dst))
        if naming == "hub-2024":
            from safetensors.torch import load_file

            tensors = load_file(str(dst / "model.safetensors"))
            _save({hf_to_hub_2024(k): v for k, v in tensors.items()}, dst)
        config = json.loads((dst / "config.json").read_text())
    elif naming == "in-memory":
        _save(state_dict(model), dst)
        config = model.config.to_dict()
    elif naming == "llava-next":
        config = _write_llava_next(model, dst, tied, llava_next or {}, drop_last_block)
    else:
        raise ValueError(naming)
    config.update(config_changes or {})
    _write_json(dst / "config.json", config)
    write_tokenizer(dst, TOKENIZER_VOCAB)
    _preprocessors(dst)
    return dst


def _write_llava_next(model, dst: Path, tied: bool, fields: dict, drop_last_block: bool) -> dict:
    renames = [("model.language_model.", "model."), ("lm_head.", "lm_head."),
               ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
               ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
               ("model.image_newline", "model.image_newline")]
    layers = model.config.vision_config.num_hidden_layers
    out = {}
    for name, t in state_dict(model).items():
        if drop_last_block and f"encoder.layers.{layers - 1}." in name:
            continue
        new = next(n + name[len(o):] for o, n in renames if name.startswith(o))
        out[new] = t
    _save(out, dst)
    tc, vc = model.config.text_config, model.config.vision_config
    config = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
        "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads, "vocab_size": tc.vocab_size,
        "rms_norm_eps": tc.rms_norm_eps, "rope_theta": tc.rope_parameters["rope_theta"],
        "max_position_embeddings": tc.max_position_embeddings, "hidden_act": "silu",
        "tie_word_embeddings": tied, "use_sliding_window": False, "torch_dtype": "float32",
        "mm_hidden_size": vc.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": model.config.vision_feature_layer,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": pinpoints(),
        "mm_newline_position": "one_token", "mm_spatial_pool_stride": 2,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": vc.hidden_size,
                          "intermediate_size": vc.intermediate_size,
                          "num_hidden_layers": vc.num_hidden_layers,
                          "num_attention_heads": vc.num_attention_heads,
                          "image_size": vc.image_size, "patch_size": vc.patch_size,
                          "hidden_act": vc.hidden_act, "layer_norm_eps": vc.layer_norm_eps},
    }
    config.update(fields)
    return config


# ---------------------------------------------------------------------------------------
# Frames (design.md §1.1, §1.2, §2.1), written from the spec
# ---------------------------------------------------------------------------------------


def frame_positions(n: int, num_frames: int, rule: str) -> list[int]:
    if rule == "linspace":
        return [int(i) for i in np.linspace(0, n - 1, num_frames).astype(int)]
    assert rule == "midpoint", rule
    return [math.floor((i + 0.5) * n / num_frames) for i in range(num_frames)]


_DECODED: dict = {}


def decoded(video) -> list[np.ndarray]:
    """Every frame of the file (RGB), by OpenCV's sequential read; memoized."""
    from tests.videos import decode_all

    key = str(video)
    if key not in _DECODED:
        _DECODED[key] = decode_all(video)
    return _DECODED[key]


def pixels(frames: Sequence[np.ndarray], size: int, mean, std) -> torch.Tensor:
    """RGB uint8 frames -> (T, 3, S, S) float32 (design.md §1.2)."""
    return normalize([resize_frame(f, size) for f in frames], mean, std)


def visual_token_count(grid: int, recipe: dict) -> int:
    """design.md §2.1's token count for a recipe, newline tokens included."""
    total = 0
    for slow in (True, False):
        n = sum((i % recipe["slow_every"] == 0) == slow for i in range(recipe["num_frames"]))
        stride = recipe["slow_stride"] if slow else recipe["fast_stride"]
        g = grid // stride if recipe["pool_mode"] == "average" else -(-grid // stride)
        per = {"grid": g * (g + 1), "frame": g * g + 1}.get(recipe["newline"], g * g)
        total += n * per
    return total + (recipe["newline"] == "one_token")


# ---------------------------------------------------------------------------------------
# Prompt and greedy decoding
# ---------------------------------------------------------------------------------------


class _Text:
    def __init__(self, source_dir):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
        ends = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        self.end_ids = {i for i in ends if isinstance(i, int)}

    def pieces(self, question: str) -> tuple[list[int], list[int]]:
        """design.md §1.7: the ChatML text before and after `<image>`, each tokenized on its own."""
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        return (enc(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"),
                enc(f"\n{question}<|im_end|>\n<|im_start|>assistant\n"))


def _greedy(step, first_logits, max_tokens: int, end_ids, tokenizer) -> Answer:
    tokens, logprobs, margins = [], [], []
    logits = first_logits
    for _ in range(max_tokens):
        lp = torch.log_softmax(logits.double(), dim=-1)
        top = lp.topk(2).values
        margins.append(float(top[0] - top[1]))
        tok = int(lp.argmax())
        if tok in end_ids:
            break
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        logits = step(tok)
    return Answer(tokens, logprobs, tokenizer.decode(tokens), margins)


class HFVideoReference:
    """transformers' own LLaVA-OneVision video path on the sampled frames."""

    def __init__(self, model, source_dir, mean=VIDEO_MEAN, std=VIDEO_STD):
        self.model = float64_copy(model)
        self.text = _Text(source_dir)
        self.mean, self.std = mean, std
        self.size = model.config.vision_config.image_size

    def frames(self, video, num_frames: int = 32) -> list[np.ndarray]:
        all_frames = decoded(video)
        return [all_frames[i] for i in frame_positions(len(all_frames), num_frames, "linspace")]

    @torch.no_grad()
    def answer(self, video, question: str, max_tokens: int, num_frames: int = 32) -> Answer:
        pv = pixels(self.frames(video, num_frames), self.size, self.mean, self.std)
        g = -(-(self.size // self.model.config.vision_config.patch_size) // 2)
        n_visual = num_frames * g * g + 1  # transformers' pooling + one newline
        before, after = self.text.pieces(question)
        ids = torch.tensor([before + [VIDEO_TOKEN] * n_visual + after])
        out = self.model(input_ids=ids, pixel_values_videos=pv[None].double(), use_cache=True)
        state = {"cache": out.cache}

        def step(tok):
            o = self.model(input_ids=torch.tensor([[tok]]), cache=state["cache"], use_cache=True)
            state["cache"] = o.cache
            return o.logits[0, -1]

        ans = _greedy(step, out.logits[0, -1], max_tokens, self.text.end_ids, self.text.tokenizer)
        ans.prompt_tokens = ids.shape[1]
        ans.visual_tokens = n_visual
        return ans


@dataclass(frozen=True)
class Mistakes:
    """The usual mistakes of a OneVision / LLaVA-Video port, each off by default."""

    newline: Optional[str] = None  # another newline rule ("none": missing; "first": before the video)
    pool_mode: Optional[str] = None  # e.g. "average" instead of "bilinear"
    post_layernorm: bool = False  # the tower's post-LayerNorm applied to the feature
    frame_positions: Optional[str] = None  # e.g. "midpoint" instead of "linspace"
    feature_layer: Optional[int] = None  # another hidden state of the tower


class RecipeReference:
    """design.md §2.1 in torch, on the transformers model's submodules (float64)."""

    def __init__(self, model, source_dir, feature_layer: int, mean=VIDEO_MEAN, std=VIDEO_STD):
        self.model = float64_copy(model)
        self.text = _Text(source_dir)
        self.feature_layer = feature_layer  # an index into the tower's hidden states
        self.mean, self.std = mean, std
        vc = model.config.vision_config
        self.size, self.grid = vc.image_size, vc.image_size // vc.patch_size

    def frames(self, video, recipe: dict) -> tuple[list[np.ndarray], list[int]]:
        all_frames = decoded(video)
        idx = frame_positions(len(all_frames), recipe["num_frames"], recipe["frame_positions"])
        return [all_frames[i] for i in idx], idx

    @torch.no_grad()
    def features(self, px: torch.Tensor, m: Mistakes) -> torch.Tensor:
        tower = self.model.model.vision_tower
        out = tower(pixel_values=px.double(), output_hidden_states=True)
        layer = self.feature_layer if m.feature_layer is None else m.feature_layer
        x = out.hidden_states[layer]
        if m.post_layernorm:
            x = tower.post_layernorm(x) if hasattr(tower, "post_layernorm") else \
                tower.vision_model.post_layernorm(x)
        return x

    @staticmethod
    def pool(x: torch.Tensor, stride: int, mode: str) -> torch.Tensor:
        """(T, G, G, C) -> (T, g, g, C) by design.md §1.5 / §2.1."""
        x = x.permute(0, 3, 1, 2)
        g = x.shape[-1]
        if mode == "average" or (mode == "auto" and g % stride == 0):
            y = F.avg_pool2d(x, kernel_size=stride, stride=stride)
        else:
            y = F.interpolate(x, size=(-(-g // stride),) * 2, mode="bilinear", align_corners=False)
        return y.permute(0, 2, 3, 1)

    @staticmethod
    def with_newlines(block: torch.Tensor, rule: str, newline: torch.Tensor) -> torch.Tensor:
        T, g, _, D = block.shape
        if rule == "grid":
            block = torch.cat([block, newline.expand(T, g, 1, D)], dim=2)
        elif rule == "frame":
            return torch.cat([block.reshape(T, g * g, D), newline.expand(T, 1, D)], dim=1).reshape(-1, D)
        return block.reshape(-1, D)

    @torch.no_grad()
    def visual_tokens(self, video, recipe: dict, m: Mistakes = Mistakes()) -> torch.Tensor:
        r = dict(recipe)
        if m.frame_positions:
            r["frame_positions"] = m.frame_positions
        frames, _ = self.frames(video, r)
        feats = self.features(pixels(frames, self.size, self.mean, self.std), m)
        T, N, _ = feats.shape
        grid = self.model.model.multi_modal_projector(feats).reshape(T, self.grid, self.grid, -1)
        pool_mode = m.pool_mode or r["pool_mode"]
        rule = m.newline or r["newline"]
        newline = self.model.model.image_newline
        blocks = []
        for slow in (True, False):
            pos = [i for i in range(T) if (i % r["slow_every"] == 0) == slow]
            if pos:
                stride = r["slow_stride"] if slow else r["fast_stride"]
                pooled = self.pool(grid[pos], stride, pool_mode)
                blocks.append(self.with_newlines(pooled, rule, newline))
        tokens = torch.cat(blocks)
        if rule == "one_token":
            tokens = torch.cat([tokens, newline[None]])
        elif rule == "first":  # misplaced: before the video instead of after it
            tokens = torch.cat([newline[None], tokens])
        return tokens

    @torch.no_grad()
    def answer(self, video, question: str, max_tokens: int, recipe: dict,
               m: Mistakes = Mistakes()) -> Answer:
        visual = self.visual_tokens(video, recipe, m)
        before, after = self.text.pieces(question)
        llm, head = self.model.model.language_model, self.model.lm_head
        emb = llm.embed_tokens
        embeds = torch.cat([emb(torch.tensor(before)), visual, emb(torch.tensor(after))])
        out = llm(inputs_embeds=embeds[None], use_cache=True)
        state = {"cache": out.cache}

        def step(tok):
            o = llm(input_ids=torch.tensor([[tok]]), cache=state["cache"], use_cache=True)
            state["cache"] = o.cache
            return head(o.last_hidden_state[0, -1])

        ans = _greedy(step, head(out.last_hidden_state[0, -1]), max_tokens, self.text.end_ids,
                      self.text.tokenizer)
        ans.prompt_tokens = embeds.shape[0]
        ans.visual_tokens = visual.shape[0]
        return ans


def replace_recipe(recipe: dict, **changes) -> dict:
    return {**recipe, **changes}


__all__ = ["TINY_OV", "NAMINGS", "Mistakes", "HFVideoReference", "RecipeReference", "build_model",
           "write_checkpoint", "frame_positions", "visual_token_count", "slowfast_recipe",
           "llava_video_native", "ONEVISION_NATIVE", "replace_recipe"]
