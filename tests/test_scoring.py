"""Scoring one eval answer: label words, yes/no, numbers, transcripts, agreement with the reference."""

import pytest

from desta.evaluation.scoring import agreement, score_label, score_number, score_transcript, score_yesno

GENDERS = ["Female", "Male"]


@pytest.mark.parametrize("answer, expected", [
    ("Female", 1.0), ("The speaker is a woman.", 1.0), ("She sounds calm.", 1.0), ("female voice", 1.0),
    ("Male", 0.0), ("It is a man speaking.", 0.0), ("I can't tell.", 0.0), ("Either male or female.", 0.0),
])
def test_gender_answers(answer, expected):
    assert score_label(answer, "Female", GENDERS, "gender").value == expected


@pytest.mark.parametrize("answer, gold, expected", [
    ("They talk quite slowly.", "Slow", 1.0), ("At a moderate pace.", "Normal", 1.0),
    ("Very fast!", "Slow", 0.0), ("Rapidly.", "Fast", 1.0),
])
def test_speed_answers(answer, gold, expected):
    assert score_label(answer, gold, ["Fast", "Normal", "Slow"], "speaking_speed").value == expected


def test_accent_and_number_and_transcript():
    assert score_label("A Scottish accent.", "Scottish", ["American", "British", "Scottish"], "accent").value == 1
    assert score_label("British, I think", "Scottish", ["American", "British", "Scottish"], "accent").value == 0
    assert score_number("Roughly 4 seconds", 3.6).value == 1 and score_number("20 s", 3.6).value == 0
    assert score_number("no idea", 3.6).reason == "no number"
    assert score_transcript("Excuse me, where's the station?", "excuse me where is the station").value == 1.0
    assert score_transcript("", "excuse me").value == 0.0


def test_yes_no_items():
    assert score_yesno("Yes, it is a woman.", "yes").value == 1 and score_yesno("No.", "yes").value == 0
    assert score_yesno("It might be.", "no").reason == "says neither yes nor no"


def test_rouge_l_and_label_agreement_with_the_text_reference():
    item = {"category": "gender", "choices": ["Female", "Male"], "check": {"style": "label"}, "answer": "Female"}
    same, rouge = agreement(item, "The speaker is a woman.", "The speaker is female.")
    assert same == 1.0 and rouge == pytest.approx(2 / 3)  # "the speaker is": P 3/5, R 3/4
    assert agreement(item, "A man.", "A woman.")[0] == 0.0
    assert agreement(item, "Hard to say.", "Hard to say.")[0] == 0.0  # deciding nothing is not agreeing
    open_item = {"category": "open", "choices": None, "check": {"style": "open"}, "answer": None}
    assert agreement(open_item, "a calm voice", "a calm voice") == (None, 1.0)
