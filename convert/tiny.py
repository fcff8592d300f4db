"""Tiny SF-LLaVA-1.5-shaped SOURCE checkpoints, with Hugging Face names.

Tests, the demo and the benchmarks need a checkpoint that looks exactly like a
real one (config.json fields, tensor names and shapes of SPEC §3, a Qwen2
byte-level BPE tokenizer) but fits in a few hundred kilobytes. This module
writes one from random weights with a fixed seed, using numpy, safetensors'
file format and `tokenizers` only (torch is optional where `make demo` runs).

    from convert.tiny import write_source_checkpoint
    src = write_source_checkpoint(tmp_path / "src", layout="oryx-vit", seed=0)

Every tensor draws from its own generator seeded by (seed, name), so adding or
dropping one tensor does not change the others.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

LAYOUTS = ("oryx-vit", "llava-siglip")

LLM_PREFIX = "model."
PROJECTOR_PREFIX = "model.mm_projector."
SIGLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
ORYX_PREFIX = "model.vision_tower.vision_tower."

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-*).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small English corpus so that common words become single tokens.
CORPUS = """\
You are a helpful assistant. What happens in this video? Describe the video in detail.
The video shows a person walking along a street, then a red car drives past the camera.
A man is cooking in a kitchen. A woman is playing the piano. Two children play football in a park.
The camera moves slowly from left to right. The scene changes to a beach at sunset.
What color is the car? The car is red. What color is the sky? The sky is blue and the sun is yellow.
How many people are in the video? There are three people. Where does the video take place?
It takes place in a city at night, with lights, buildings, cars and a bridge over the river.
At the beginning of the video, a dog runs across the grass. At the end, the dog sleeps.
First, second, third, then, next, finally, before, after, during, while, because, so.
The quick brown fox jumps over the lazy dog. One two three four five six seven eight nine ten.
Question: what is the main object? Answer: a green ball on a white table near a black chair.
The weather is sunny, cloudy, rainy or snowy. The time is morning, afternoon, evening or night.
He opens the door, she closes the window, they look at the screen and talk about the movie.
This is a short clip of a cat, a bird, a horse, a fish and a tree in the garden.
Summarize the video. The video is about a trip to the mountains with friends and family.
Yes. No. Maybe. I do not know. It is not clear from the video. Please answer the question.
0123456789 , . ! ? : ; ' " ( ) [ ] - _ / + = * & % $ # @
"""

SIGLIP_SO400M = "google/siglip-so400m-patch14-384"


# ----------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(vocab_size: int = 640):
    """A Qwen2-style byte-level BPE tokenizer trained on CORPUS (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # As in Qwen2, the special tokens come after the BPE vocabulary.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _tokenizer_config(tok) -> dict:
    decoder = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(path: Path, vocab_size: int = 640) -> int:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json; return its size."""
    path = Path(path)
    tok = build_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    tok.model.save(str(path))  # vocab.json + merges.txt, as Qwen ships them
    _write_json(path / "tokenizer_config.json", _tokenizer_config(tok))
    return tok.get_vocab_size(with_added_tokens=True)


# ----------------------------------------------------------------------------------------
# Tensors


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _tensor_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return "norm"
    if leaf == "bias":
        return "bias"
    return "weight"


def make_tensor(seed: int, name: str, shape, std: float) -> np.ndarray:
    """Initialiser-like random values: N(0, std) weights, ~1 norm scales, small biases."""
    g = _rng(seed, name)
    kind = _tensor_kind(name)
    x = g.standard_normal(shape, dtype=np.float32)
    if kind == "norm":
        return 1.0 + np.float32(0.1) * x
    if kind == "bias":
        return np.float32(0.02) * x
    return np.float32(std) * x


def llm_shapes(*, hidden, llm_layers, heads, kv_heads, intermediate, vocab, tied):
    head_dim = hidden // heads
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(llm_layers):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        s[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
        s[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        s[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
        s[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        s[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        s[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        s[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        s[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        s[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        s[p + "input_layernorm.weight"] = (hidden,)
        s[p + "post_attention_layernorm.weight"] = (hidden,)
    s["model.norm.weight"] = (hidden,)
    if not tied:
        s["lm_head.weight"] = (vocab, hidden)
    return s


def projector_shapes(*, vision_hidden, hidden):
    return {
        PROJECTOR_PREFIX + "0.weight": (hidden, vision_hidden),
        PROJECTOR_PREFIX + "0.bias": (hidden,),
        PROJECTOR_PREFIX + "2.weight": (hidden, hidden),
        PROJECTOR_PREFIX + "2.bias": (hidden,),
    }


def _linear(s, name, out_dim, in_dim):
    s[name + ".weight"] = (out_dim, in_dim)
    s[name + ".bias"] = (out_dim,)


def _norm(s, name, dim):
    s[name + ".weight"] = (dim,)
    s[name + ".bias"] = (dim,)


def siglip_shapes(*, vision_hidden, vision_layers, vision_mlp, patch_size, pos_grid,
                  post_layernorm=True, siglip_head=False):
    """HF SiglipVisionModel names under SIGLIP_PREFIX."""
    d, p = vision_hidden, SIGLIP_PREFIX
    s = {
        p + "embeddings.patch_embedding.weight": (d, 3, patch_size, patch_size),
        p + "embeddings.patch_embedding.bias": (d,),
        p + "embeddings.position_embedding.weight": (pos_grid * pos_grid, d),
    }
    for i in range(vision_layers):
        b = f"{p}encoder.layers.{i}."
        _norm(s, b + "layer_norm1", d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, b + "self_attn." + proj, d, d)
        _norm(s, b + "layer_norm2", d)
        _linear(s, b + "mlp.fc1", vision_mlp, d)
        _linear(s, b + "mlp.fc2", d, vision_mlp)
    if post_layernorm:
        _norm(s, p + "post_layernorm", d)
    if siglip_head:  # SiglipMultiheadAttentionPoolingHead
        s[p + "head.probe"] = (1, 1, d)
        s[p + "head.attention.in_proj_weight"] = (3 * d, d)
        s[p + "head.attention.in_proj_bias"] = (3 * d,)
        _linear(s, p + "head.attention.out_proj", d, d)
        _norm(s, p + "head.layernorm", d)
        _linear(s, p + "head.mlp.fc1", vision_mlp, d)
        _linear(s, p + "head.mlp.fc2", d, vision_mlp)
    return s


def oryx_shapes(*, vision_hidden, vision_layers, vision_mlp, patch_size, pos_grid,
                final_norm=False):
    """Oryx-ViT (timm) names under ORYX_PREFIX."""
    d, p = vision_hidden, ORYX_PREFIX
    s = {
        p + "patch_embed.proj.weight": (d, 3, patch_size, patch_size),
        p + "patch_embed.proj.bias": (d,),
        p + "pos_embed": (1, pos_grid * pos_grid, d),
    }
    for i in range(vision_layers):
        b = f"{p}blocks.{i}."
        _norm(s, b + "norm1", d)
        _linear(s, b + "attn.qkv", 3 * d, d)
        _linear(s, b + "attn.proj", d, d)
        _norm(s, b + "norm2", d)
        _linear(s, b + "mlp.fc1", vision_mlp, d)
        _linear(s, b + "mlp.fc2", d, vision_mlp)
    if final_norm:
        _norm(s, p + "norm", d)
    return s


# ----------------------------------------------------------------------------------------
# safetensors writing (by hand: numpy has no bfloat16, and big files stream tensor by tensor)

_ST_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}


def _to_bytes(x: np.ndarray, dtype: str) -> bytes:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.tobytes()
    if dtype == "float16":
        return x.astype(np.float16).tobytes()
    # bfloat16: round-to-nearest-even on the upper 16 bits of float32
    u = x.view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16).tobytes()


def write_safetensors(path: Path, shapes: dict, make, dtype: str) -> int:
    """Write tensors `make(name, shape) -> float32 ndarray` to one safetensors file.

    Returns the number of data bytes. Tensors are produced and written one at a time.
    """
    code, size = _ST_DTYPES[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in shapes.items():
            f.write(_to_bytes(make(name, shape), dtype))
    return offset


def _split_shards(shapes: dict, shards: int) -> list[dict]:
    """Split into `shards` groups of roughly equal element count, keeping order."""
    total = sum(int(np.prod(s)) for s in shapes.values())
    groups, acc = [{}], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if groups[-1] and acc >= total * len(groups) / shards and len(groups) < shards:
            groups.append({})
        groups[-1][name] = shape
        acc += n
    while len(groups) < shards:  # more shards than tensors would split: keep them non-empty
        big = max(range(len(groups)), key=lambda i: len(groups[i]))
        items = list(groups[big].items())
        if len(items) < 2:
            break
        half = len(items) // 2
        groups[big] = dict(items[:half])
        groups.insert(big + 1, dict(items[half:]))
    return groups


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------
# The checkpoint


def write_source_checkpoint(
    path,
    layout: str = "oryx-vit",
    *,
    seed: int = 0,
    tied: bool = True,
    rope_style: str = "rope_theta",
    rope_theta: float = 1000000.0,
    shards: int = 1,
    vision_config_in_config: bool = True,
    dtype: str = "float32",
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    vision_mlp: int = 64,
    vision_act: Optional[str] = None,
    pos_grid: Optional[int] = None,
    hidden: int = 64,
    llm_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: Optional[int] = None,
    tokenizer_vocab: int = 640,
    mm_vision_select_layer: Optional[int] = None,
    mm_vision_tower: Optional[str] = None,
    post_layernorm: bool = True,
    siglip_head: bool = False,
    final_norm: bool = False,
    std: float = 0.05,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    preprocessor: bool = True,
    extra_tensors: Optional[dict] = None,
    drop_tensors: Iterable[str] = (),
    extra_config: Optional[dict] = None,
    drop_config_keys: Iterable[str] = (),
    model_type: str = "llava",
    pickle: bool = False,
) -> Path:
    """Write a tiny SF-LLaVA-1.5 source checkpoint with HF names to `path`; return it.

    layout: "oryx-vit" (timm names, fused qkv, pos_embed (1, G0*G0, Dv)) or
      "llava-siglip" (HF SigLIP names under `vision_model.`).
    pos_grid: G0 of the learned position table (default image_size // patch_size).
    mm_vision_select_layer: written to config.json; None writes the layout's usual
      value (-1 for oryx-vit, -2 for llava-siglip). Drop the key with
      drop_config_keys=("mm_vision_select_layer",).
    rope_style: "rope_theta" (transformers 4) or "rope_parameters" (transformers 5).
    vocab_size: the LLM's vocabulary (default: the tokenizer's, padded to a multiple of 64).
    extra_tensors: {name: ndarray or shape tuple} added as they are (e.g. a learned
      `model.image_newline`); drop_tensors: names left out.
    pickle: write `pytorch_model.bin` with torch.save instead of safetensors (needs torch).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_ST_DTYPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    siglip = layout == "llava-siglip"
    pos_grid = pos_grid or image_size // patch_size
    vision_act = vision_act or ("gelu_pytorch_tanh" if siglip else "gelu")

    n_tok = write_tokenizer(path, tokenizer_vocab)
    ids = {t: n_tok - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab = vocab_size or -(-n_tok // 64) * 64
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tok})")

    # --- tensors
    shapes = llm_shapes(hidden=hidden, llm_layers=llm_layers, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, vocab=vocab, tied=tied)
    shapes.update(projector_shapes(vision_hidden=vision_hidden, hidden=hidden))
    vargs = dict(vision_hidden=vision_hidden, vision_layers=vision_layers, vision_mlp=vision_mlp,
                 patch_size=patch_size, pos_grid=pos_grid)
    if siglip:
        shapes.update(siglip_shapes(**vargs, post_layernorm=post_layernorm, siglip_head=siglip_head))
    else:
        shapes.update(oryx_shapes(**vargs, final_norm=final_norm))
    fixed = {}
    for name, value in (extra_tensors or {}).items():
        if isinstance(value, np.ndarray):
            fixed[name] = value.astype(np.float32)
            shapes[name] = value.shape
        else:
            shapes[name] = tuple(value)
    for name in drop_tensors:
        shapes.pop(name, None)

    def make(name, shape):
        if name in fixed:
            return fixed[name]
        return make_tensor(seed, name, shape, std)

    if pickle:
        _write_pickle(path / "pytorch_model.bin", shapes, make, dtype)
    elif shards <= 1:
        write_safetensors(path / "model.safetensors", shapes, make, dtype)
    else:
        groups = _split_shards(shapes, shards)
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            total += write_safetensors(path / fname, group, make, dtype)
            weight_map.update({name: fname for name in group})
        _write_json(path / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})

    # --- config.json: Qwen2 fields + LLaVA's mm_* fields, as LLaVA-NeXT's LlavaQwen checkpoints
    # carry them (lmms-lab/llava-onevision-qwen2-*: model_type "llava", LlavaQwenForCausalLM)
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": model_type,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": llm_layers,
        "num_attention_heads": heads,
        "num_hidden_layers": llm_layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision_hidden,
        "mm_patch_merge_type": "flat",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": (mm_vision_select_layer if mm_vision_select_layer is not None
                                   else (-2 if siglip else -1)),
        "mm_vision_tower": mm_vision_tower or (SIGLIP_SO400M if siglip else "oryx_vit:oryx_vit.pth"),
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
    }
    if rope_style == "rope_theta":
        config["rope_theta"] = rope_theta
    elif rope_style == "rope_parameters":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
        config["dtype"] = config.pop("torch_dtype")
    else:
        raise ValueError("rope_style must be 'rope_theta' or 'rope_parameters'")
    if vision_config_in_config:
        config["vision_config"] = {
            "model_type": "siglip_vision_model",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_mlp,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": vision_act,
            "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0,
        }
    config.update(extra_config or {})
    for key in drop_config_keys:
        config.pop(key, None)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json",
                {"bos_token_id": ids["<|endoftext|>"],
                 "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]})

    if preprocessor:
        _write_json(path / "preprocessor_config.json", {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(image_mean),
            "image_std": list(image_std),
            "image_processor_type": "SiglipImageProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        })
    return path


def _write_pickle(path: Path, shapes: dict, make, dtype: str) -> None:
    import torch  # only for the pickle variant, which exists to test --allow-pickle

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    state = {n: torch.from_numpy(np.ascontiguousarray(make(n, s))).to(tdtype) for n, s in shapes.items()}
    torch.save(state, path)


def read_safetensors_numpy(file) -> dict:
    """One safetensors file as float32 numpy arrays, bfloat16 included (numpy lacks it)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[b:e]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            x = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16}[info["dtype"]])
        out[name] = x.astype(np.float32).reshape(info["shape"])
    return out


def read_source_tensors(path) -> dict:
    """All tensors of a safetensors checkpoint directory, as float32 numpy (for tests)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(read_safetensors_numpy(f))
    return out
