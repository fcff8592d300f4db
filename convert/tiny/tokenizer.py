"""The tiny checkpoints' tokenizer: a Qwen2-style byte-level BPE trained on a small corpus."""

from __future__ import annotations

from pathlib import Path

from .tensors import write_json

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


def build_tokenizer(vocab_size: int = 640):
    """A Qwen2-style byte-level BPE tokenizer trained on CORPUS (deterministic)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

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
    write_json(path / "tokenizer_config.json", _tokenizer_config(tok))
    return tok.get_vocab_size(with_added_tokens=True)
