"""Scoring speech eval answers: closed labels, yes/no, numbers, word error rate, IFEval formats, and an LLM
judge for open questions; agreement between two systems' answers.

Every scorer takes the model's answer and the item's gold data and returns a score in [0, 1]
(1 = right) plus a short reason, so reports can show why an answer failed. A closed answer is read
honestly: what it quotes (the transcript, text in quotation marks) is not read as its answer, and an
echo of the description (its format, or the values of two or more fields it was not asked about)
scores 0 with the reason "echo", however right the asked field happens to be.
"""

from __future__ import annotations

import re
from typing import Any

from desta.core.instructions import Score, follows
from desta.describe.attributes import LABEL_WORDS, named_labels
from desta.describe.description import DESCRIPTION_NAMES, parse_description
from desta.evaluation.items import CLOSED, parsed

DURATION_TOLERANCE = 0.2  # a duration is right within 20 % of the gold length ...
DURATION_MINIMUM = 0.5  # ... or within half a second (what a description rounded to whole seconds can be off by)
ECHO_FIELDS = 2  # an answer naming the values of this many fields it was not asked about is an echo
_STAMP = re.compile(r"\[\d\d:\d\d-\d\d:\d\d\]")  # the description's time span, "[00:00-00:03]"
_FIELD_VALUE = re.compile(r"\b(?:" + "|".join(re.escape(name) for name in DESCRIPTION_NAMES.values()) + r")\s*:\s*\w")
_QUOTED = re.compile(r"\"[^\"]*\"|\u201c[^\u201d]*\u201d")
# The labels each field can take, to find a field an answer names though it was not asked about; accent and
# emotion: the clip's own value (their label sets are open).
OTHER_FIELD_LABELS = {"gender": list(LABEL_WORDS["gender"]), "pitch": ["Low", "Normal", "High"],
                      "volume": ["Low", "Normal", "High"], "speaking_speed": ["Slow", "Normal", "Fast"]}


def without_quotes(answer: str, transcript: str | None = None) -> str:
    """The answer without what it quotes: text in quotation marks, and the clip's transcript wherever it appears
    (a transcript's "the man" is not a gender answer).

    >>> without_quotes('A woman says "the man left".'), without_quotes("It says: The man left.", "the man left.")
    ('A woman says .', 'It says: ')
    """
    text = _QUOTED.sub("", answer)
    if transcript and transcript.strip():
        text = re.sub(re.escape(transcript.strip()), "", text, flags=re.IGNORECASE)
    return text


def echo(answer: str, item: dict) -> str | None:
    """Why a closed answer is an echo of the clip's description rather than an answer, or None: it reproduces the
    description's format (its time span, or "Field: value" twice), or it names the values of ECHO_FIELDS or more
    fields other than the one asked about.

    >>> item = {"category": "accent",
    ...         "description": "[00:00-00:02] Hi. (Gender: Female, Accent: Scottish, Pitch: High)"}
    >>> echo("Gender: Female, Accent: Scottish", item), echo("A woman with a high pitch, Scottish.", item)
    ('reproduces the description format', 'names 2 fields not asked about (gender, pitch)')
    >>> echo("A Scottish accent, I think.", item) is None
    True
    """
    if _STAMP.search(answer) or len(_FIELD_VALUE.findall(answer)) >= 2:
        return "reproduces the description format"
    if not item.get("description"):
        return None
    _, gold = parse_description(str(item["description"]).splitlines()[0])
    text = without_quotes(answer, item.get("transcript"))
    named = []
    for field_name, value in gold.items():
        if field_name == item["category"] or field_name not in CLOSED:
            continue
        labels = OTHER_FIELD_LABELS.get(field_name, [value])
        if named_labels(text, labels, field_name, bare_levels=False):
            named.append(field_name)
    if len(named) >= ECHO_FIELDS:
        return f"names {len(named)} fields not asked about ({', '.join(named)})"
    return None


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


def score_number(answer: str, gold: float, tolerance: float = DURATION_TOLERANCE,
                 minimum: float = DURATION_MINIMUM) -> Score:
    """Right when the first number in the answer is within 20 % of gold, or within 0.5 (what rounding to whole
    seconds costs): a constant guess cannot pass half the clips of a corpus of 1-6 s clips.

    >>> score_number("About 3 seconds.", 2.6).value, score_number("3 seconds", 1.6).value
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


# ----- one item -----

def score_item(item: dict, answer: str) -> dict[str, Any]:
    """{"score": 0..1 or None (needs a judge), "reason"} for one answer."""
    category, choices, check = item["category"], parsed(item, "choices"), parsed(item, "check") or {}
    style = check.get("style")
    closed = style in ("yesno", "number", "label") or category == "duration" or (choices and style != "transcript")
    if closed:
        reason = echo(answer, item)
        if reason:
            return {"score": 0.0, "reason": f"echo: {reason}"}
        answer = without_quotes(answer, item.get("transcript"))
    if style == "ifeval":
        result = follows(answer, check["instruction"])
    elif style == "yesno":
        result = score_yesno(answer, item["answer"])
    elif style == "number" or category == "duration":
        result = score_number(answer, float(item["answer"]))
    elif style == "transcript" or category == "transcription":
        result = score_transcript(answer, item["answer"])
    elif choices:
        result = score_label(answer, item["answer"], choices, category if category in CLOSED else None)
    elif style != "open" and item.get("answer"):
        result = score_transcript(answer, item["answer"])  # free-form gold: closeness in words
    else:
        return {"score": None, "reason": "needs a judge"}
    return {"score": result.value, "reason": result.reason}


def decision(item: dict, answer: str) -> str | None:
    """What a closed answer decides (the one label named, yes/no, whole seconds), or None when it decides
    nothing or the item is not closed; two systems agree when their decisions are the same."""
    category, choices, check = item["category"], parsed(item, "choices"), parsed(item, "check") or {}
    answer = without_quotes(answer, item.get("transcript"))
    if check.get("style") == "yesno":
        return yes_or_no(answer)
    if check.get("style") == "number" or category == "duration":
        number = first_number(answer)
        return None if number is None else str(round(number))
    if choices:
        named = named_labels(answer, choices, category if category in CLOSED else None)
        return named.pop() if len(named) == 1 else None
    return None


def agreement(item: dict, answer: str, reference: str) -> tuple[float | None, float]:
    """(same decision as the reference, or None for items without one; ROUGE-L F of the two answers)."""
    same = None
    if (parsed(item, "check") or {}).get("style") in ("yesno", "label", "number") or parsed(item, "choices"):
        mine, theirs = decision(item, answer), decision(item, reference)
        same = float(mine is not None and mine == theirs)
    return same, rouge_l(reference, answer)


JUDGE_PROMPT = ("You are grading an answer about an audio clip. The clip's description is:\n{description}\n\n"
                "Question: {instruction}\nAnswer: {answer}\n\nIs the answer accurate and relevant to the clip? "
                "Reply with YES or NO only.")


def judge_prompt(item: dict, answer: str) -> list[dict] | None:
    """The judge's conversation for an item no rule scores (an open question), given the clip's gold
    description; None for the others."""
    if score_item(item, answer)["score"] is not None:
        return None
    return [{"role": "user", "content": JUDGE_PROMPT.format(description=item["description"],
                                                           instruction=item["instruction"], answer=answer)}]


def judge_verdict(item: dict, replies: list[str]) -> dict[str, Any]:
    """The judge's YES/NO as a score.

    >>> judge_verdict({}, [" yes."])
    {'score': 1.0, 'reason': 'judge: yes.'}
    """
    reply = replies[0].strip()
    return {"score": float(reply.upper().startswith("YES")), "reason": f"judge: {reply[:10]}"}
