"""Is a generated text looping? Shared by the targets filter and Magpie pseudo replay."""

from __future__ import annotations

import re
import zlib

REPETITION_COMPRESSION = 2.4  # like Whisper: text that gzip shrinks more than 2.4x is looping
REPETITION_MIN_CHARS = 80  # shorter texts are too short for the compression test
REPEATED_NGRAM = (3, 4)  # ... or the same 3 words 4 times in a row


def repeated_ngram(words: list[str]) -> str | None:
    """The first 3-word sequence repeated 4 times in a row, or None.

    >>> repeated_ngram("a man speaks a man speaks a man speaks a man speaks".split())
    'a man speaks'
    """
    n, times = REPEATED_NGRAM
    for start in range(len(words) - n * times + 1):
        gram = words[start : start + n]
        if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(times)):
            return " ".join(gram)
    return None


def looping(text: str) -> str | None:
    """Why `text` reads as a repetition loop, or None.

    >>> looping("Hello there, how are you?") is None
    True
    """
    if len(text) >= REPETITION_MIN_CHARS and len(text.encode()) / len(zlib.compress(text.encode())) > \
            REPETITION_COMPRESSION:
        return f"repetition loop (compresses more than {REPETITION_COMPRESSION}x)"
    gram = repeated_ngram(re.findall(r"\w+", text.lower()))
    if gram:
        return f"repetition loop ({gram!r} {REPEATED_NGRAM[1]} times in a row)"
    return None
