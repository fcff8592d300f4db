"""The ChatML prompt around the video (design.md §1.7).

`<image>` is not a vocabulary token: the text before and after it is tokenized on its
own and the visual embeddings are spliced in between. The user's question is always
text, even if it contains "<image>".
"""



def first_turn(system_prompt: str, question: str) -> tuple[str, str]:
    """The text before and after the video placeholder of the first turn."""
    before = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
    after = f"\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return before, after


def time_instruction(duration: float, timestamps) -> str:
    """LLaVA-Video's time instruction (design.md §2.2), placed between the video and the question.
    The missing space before "Please" is LLaVA-Video's own."""
    times = ",".join(f"{t:.2f}s" for t in timestamps)
    return (f"The video lasts for {duration:.2f} seconds, and {len(timestamps)} frames are "
            f"uniformly sampled from it. These frames are located at {times}."
            "Please answer the following questions related to this video.")


def next_turn(question: str) -> str:
    """Appended after the previous answer's tokens (its end token excluded)."""
    return f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer, text: str) -> list[int]:
    # No BOS for Qwen; special-token text like <|im_start|> maps to its id.
    return tokenizer.encode(text, add_special_tokens=False)


SUBTITLES_HEADER = "This video's subtitles are listed below: \n"


def subtitle_block(lines) -> str:
    """lmms-eval's Video-MME wording for the subtitles the sampled frames select (design.md
    §2.5), placed after the time instruction and before the question; "" for none."""
    lines = list(lines)
    return SUBTITLES_HEADER + "\n".join(lines) if lines else ""
