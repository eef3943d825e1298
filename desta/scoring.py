"""Scorers for evaluation answers: closed labels, numbers, word error rate, verifiable formats.

Every scorer takes the model's answer and the item's gold data and returns a score in [0, 1]
(1 = right) plus a short reason, so reports can show why an answer failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Words that name each label, per attribute (lowercase, matched on word boundaries).
LABEL_WORDS: dict[str, dict[str, list[str]]] = {
    "gender": {"Male": ["male", "man", "masculine", "boy", "gentleman", "he", "his", "him"],
               "Female": ["female", "woman", "feminine", "girl", "lady", "she", "her"]},
    "speaking_speed": {"Slow": ["slow", "slowly", "leisurely", "unhurried"],
                       "Normal": ["normal", "moderate", "average", "steady", "medium", "regular"],
                       "Fast": ["fast", "quick", "quickly", "rapid", "rapidly", "brisk", "hurried"]},
    "pitch": {"Low": ["low", "deep", "lower"], "Normal": ["normal", "medium", "moderate", "average", "mid"],
              "High": ["high", "higher", "high-pitched"]},
    "volume": {"Low": ["quiet", "soft", "low", "faint", "whisper"], "Normal": ["normal", "moderate", "medium",
                                                                             "average"],
               "High": ["loud", "high", "booming", "noisy"]},
}


@dataclass
class Score:
    value: float  # 0..1
    reason: str


def _mentions(answer: str, words: list[str]) -> list[int]:
    text = answer.lower()
    return [m.start() for w in words for m in re.finditer(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]


def score_label(answer: str, gold: str, labels: list[str], attribute: str | None = None) -> Score:
    """Right when the answer names the gold label and no other label of the set.

    >>> score_label("The speaker sounds like a woman.", "Female", ["Female", "Male"], "gender").value
    1.0
    >>> score_label("Male or female, hard to say.", "Female", ["Female", "Male"], "gender").value
    0.0
    """
    words = LABEL_WORDS.get(attribute or "", {})
    named = {label for label in labels if _mentions(answer, [label.lower(), *words.get(label, [])])}
    if not named:
        return Score(0.0, "names none of the labels")
    if named != {gold}:
        return Score(0.0, f"names {sorted(named)}, gold {gold}")
    return Score(1.0, "right label")


def score_number(answer: str, gold: float, tolerance: float = 0.25, minimum: float = 1.0) -> Score:
    """Right when the first number in the answer is within 25 % (at least 1) of gold.

    >>> score_number("About 3 seconds.", 2.6).value, score_number("ten", 2.6).value
    (1.0, 0.0)
    """
    match = re.search(r"-?\d+(?:\.\d+)?", answer)
    if not match:
        return Score(0.0, "no number")
    value = float(match.group(0))
    ok = abs(value - gold) <= max(minimum, tolerance * gold)
    return Score(float(ok), f"said {value:g}, gold {gold:g}")


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER after whisper's English text normaliser (jiwer)."""
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref.strip():
        return 0.0 if not hyp.strip() else 1.0
    return jiwer.wer(ref, hyp if hyp.strip() else "<empty>")


def score_transcript(answer: str, gold: str) -> Score:
    wer = word_error_rate(gold, answer)
    return Score(max(0.0, 1.0 - wer), f"WER {wer:.2f}")


# ----- verifiable formats (IFEval-style) -----

def _strip_fences(text: str) -> str:
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, flags=re.S)
    return match.group(1) if match else text.strip()


def check_json_keys(answer: str, keys: list[str]) -> Score:
    """A JSON object with exactly these keys (a ```json fence around it is allowed).

    >>> check_json_keys('{"gender": "male", "transcript": "hi"}', ["gender", "transcript"]).value
    1.0
    >>> check_json_keys('{"gender": "male",}', ["gender"]).reason
    'not valid JSON'
    """
    try:
        value = json.loads(_strip_fences(answer))
    except json.JSONDecodeError:
        return Score(0.0, "not valid JSON")
    if not isinstance(value, dict):
        return Score(0.0, "JSON but not an object")
    if sorted(value) != sorted(keys):
        return Score(0.0, f"keys {sorted(value)}, wanted {sorted(keys)}")
    return Score(1.0, "valid JSON with the keys")


def check_max_words(answer: str, limit: int) -> Score:
    count = len(re.findall(r"\S+", answer))
    return Score(float(0 < count <= limit), f"{count} words (limit {limit})")


def check_lowercase(answer: str) -> Score:
    ok = bool(answer.strip()) and not any(c.isupper() for c in answer)
    return Score(float(ok), "all lowercase" if ok else "has capital letters or is empty")


def check_prefix(answer: str, prefix: str) -> Score:
    ok = answer.strip().startswith(prefix)
    return Score(float(ok), "starts with the phrase" if ok else f"does not start with {prefix!r}")


def check_bullets(answer: str, count: int) -> Score:
    """Exactly `count` bullet lines ("- " or "* "), nothing else but blank lines."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    bullets = [line for line in lines if re.match(r"^[-*•]\s+\S", line)]
    ok = len(bullets) == count and len(bullets) == len(lines)
    return Score(float(ok), f"{len(bullets)} bullets in {len(lines)} lines (wanted {count})")


def check_format(answer: str, check: dict) -> Score:
    """Dispatch on an item's check spec, e.g. {"kind": "max_words", "n": 12}."""
    kind = check["kind"]
    if kind == "json_keys":
        return check_json_keys(answer, check["keys"])
    if kind == "max_words":
        return check_max_words(answer, check["n"])
    if kind == "lowercase":
        return check_lowercase(answer)
    if kind == "prefix":
        return check_prefix(answer, check["prefix"])
    if kind == "bullets":
        return check_bullets(answer, check["n"])
    raise ValueError(f"unknown format check {kind!r}")


# ----- refusals -----

REFUSAL_MARKERS = [
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able to", "i am not able to",
    "i'm unable to", "i am unable to", "i must decline", "i'm sorry, but", "i am sorry, but", "sorry, i can",
    "as an ai", "not appropriate", "i don't feel comfortable", "cannot assist", "can't assist", "cannot help",
    "can't help with", "against my", "not able to provide", "illegal", "unethical",
]


def is_refusal(answer: str) -> bool:
    """Keyword-based refusal detection (the markers above, in the first 300 characters).

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Sure! Here are three tips.")
    (True, False)
    """
    head = answer.lower()[:300].replace("’", "'")
    return any(marker in head for marker in REFUSAL_MARKERS)
