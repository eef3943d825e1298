"""Scorers for speech eval answers: closed labels, numbers, word error rate (formats: desta.core.instructions).

Every scorer takes the model's answer and the item's gold data and returns a score in [0, 1]
(1 = right) plus a short reason, so reports can show why an answer failed.
"""

from __future__ import annotations

import re

from desta.core.instructions import Score

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


def _mentions(answer: str, words: list[str]) -> list[int]:
    text = answer.lower()
    return [m.start() for w in words for m in re.finditer(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]


def named_labels(answer: str, labels: list[str], attribute: str | None = None) -> set[str]:
    """The labels of the set an answer names, by the label itself or a word for it.

    >>> sorted(named_labels("She sounds calm.", ["Female", "Male"], "gender"))
    ['Female']
    """
    words = LABEL_WORDS.get(attribute or "", {})
    return {label for label in labels if _mentions(answer, [label.lower(), *words.get(label, [])])}


def score_label(answer: str, gold: str, labels: list[str], attribute: str | None = None) -> Score:
    """Right when the answer names the gold label and no other label of the set.

    >>> score_label("The speaker sounds like a woman.", "Female", ["Female", "Male"], "gender").value
    1.0
    >>> score_label("Male or female, hard to say.", "Female", ["Female", "Male"], "gender").value
    0.0
    """
    named = named_labels(answer, labels, attribute)
    if not named:
        return Score(0.0, "names none of the labels")
    if named != {gold}:
        return Score(0.0, f"names {sorted(named)}, gold {gold}")
    return Score(1.0, "right label")


def yes_or_no(answer: str) -> str | None:
    """The first "yes" or "no" in an answer, or None.

    >>> yes_or_no("No, I don't think so."), yes_or_no("Yes."), yes_or_no("Maybe.")
    ('no', 'yes', None)
    """
    match = re.search(r"\b(yes|no)\b", answer.lower())
    return match.group(1) if match else None


def score_yesno(answer: str, gold: str) -> Score:
    """Right when the answer's first yes/no is the gold one.

    >>> score_yesno("Yes, she is.", "yes").value, score_yesno("It is hard to say.", "no").reason
    (1.0, 'says neither yes nor no')
    """
    said = yes_or_no(answer)
    if said is None:
        return Score(0.0, "says neither yes nor no")
    return Score(float(said == gold), f"said {said}, gold {gold}")


def first_number(answer: str) -> float | None:
    """The first number in an answer, or None."""
    match = re.search(r"-?\d+(?:\.\d+)?", answer)
    return float(match.group(0)) if match else None


def score_number(answer: str, gold: float, tolerance: float = 0.25, minimum: float = 1.0) -> Score:
    """Right when the first number in the answer is within 25 % (at least 1) of gold.

    >>> score_number("About 3 seconds.", 2.6).value, score_number("ten", 2.6).value
    (1.0, 0.0)
    """
    value = first_number(answer)
    if value is None:
        return Score(0.0, "no number")
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
    """1 - WER of the answer against the gold transcript (0 when the WER is 1 or more)."""
    wer = word_error_rate(gold, answer)
    return Score(max(0.0, 1.0 - wer), f"WER {wer:.2f}")


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F-measure of an answer against a reference (Google's rouge-score, Porter stemming).

    >>> round(rouge_l("The cat was sitting on the mat.", "A cat sat on the mat."), 3)
    0.615
    """
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)["rougeL"].fmeasure
