"""Language tags of subtitle tracks: `--subtitle-lang en` finds a stream tagged `eng`
(Matroska and MP4 use ISO 639-2), `en-US` (BCP 47) or a sidecar named `clip.en.srt`."""

from __future__ import annotations

from typing import Optional

# ISO 639-1 -> ISO 639-2 codes (bibliographic first, then terminological where they differ),
# for the languages subtitles are most often in.
ISO_639_2 = {
    "ar": ("ara",), "bg": ("bul",), "bn": ("ben",), "ca": ("cat",), "cs": ("cze", "ces"),
    "da": ("dan",), "de": ("ger", "deu"), "el": ("gre", "ell"), "en": ("eng",),
    "es": ("spa",), "et": ("est",), "eu": ("baq", "eus"), "fa": ("per", "fas"),
    "fi": ("fin",), "fr": ("fre", "fra"), "ga": ("gle",), "gl": ("glg",), "he": ("heb",),
    "hi": ("hin",), "hr": ("hrv",), "hu": ("hun",), "hy": ("arm", "hye"), "id": ("ind",),
    "is": ("ice", "isl"), "it": ("ita",), "ja": ("jpn",), "ka": ("geo", "kat"),
    "ko": ("kor",), "lt": ("lit",), "lv": ("lav",), "mk": ("mac", "mkd"), "ms": ("may", "msa"),
    "nb": ("nob",), "nl": ("dut", "nld"), "nn": ("nno",), "no": ("nor",), "pl": ("pol",),
    "pt": ("por",), "ro": ("rum", "ron"), "ru": ("rus",), "sk": ("slo", "slk"),
    "sl": ("slv",), "sq": ("alb", "sqi"), "sr": ("srp",), "sv": ("swe",), "ta": ("tam",),
    "th": ("tha",), "tr": ("tur",), "uk": ("ukr",), "ur": ("urd",), "vi": ("vie",),
    "zh": ("chi", "zho"),
}


def codes(tag: str) -> set:
    """Every code naming the language of `tag` (its primary subtag), lower case."""
    primary = tag.strip().lower().replace("_", "-").split("-")[0]
    out = {primary}
    for two, three in ISO_639_2.items():
        if primary == two or primary in three:
            out.update((two, *three))
    return out


def same_language(tag: Optional[str], wanted: str) -> bool:
    return bool(tag) and bool(codes(tag) & codes(wanted))
