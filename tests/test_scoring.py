"""Scoring one eval answer: label words, yes/no, numbers, transcripts, agreement with the reference."""

import numpy as np
import pytest

from desta.evaluation.scoring import (
    agreement,
    decision,
    score_item,
    score_label,
    score_number,
    score_transcript,
    score_yesno,
)

GENDERS = ["Female", "Male"]


@pytest.mark.parametrize("answer, expected", [
    ("Female", 1.0), ("The speaker is a woman.", 1.0), ("female voice", 1.0), ("A lady.", 1.0),
    ("Male", 0.0), ("It is a man speaking.", 0.0), ("I can't tell.", 0.0), ("Either male or female.", 0.0),
    ("She sounds calm.", 0.0),  # a pronoun is not a gender answer: it may belong to a quoted transcript
])
def test_gender_answers(answer, expected):
    assert score_label(answer, "Female", GENDERS, "gender").value == expected


def item(category, answer, transcript="The man left early.", style="label", choices=None, description=None):
    return {"category": category, "answer": answer, "transcript": transcript, "check": {"style": style},
            "choices": choices, "description": description or
            f"[00:00-00:02] {transcript} (Gender: Female, Accent: Scottish, Pitch: High, Volume: Low, "
            "Speaking speed: Slow, Duration: 2s)"}


def test_a_quoted_transcript_is_not_read_as_the_answer():
    gender = item("gender", "Female", choices=GENDERS)
    assert score_item(gender, 'A woman. She says "The man left early."')["score"] == 1.0
    assert score_item(gender, "She says: The man left early.")["score"] == 0.0  # no gender word of its own
    assert decision(gender, "The man left early.") is None


@pytest.mark.parametrize("answer, reason", [
    ("[00:00-00:02] The man left early. (Gender: Female, Accent: Scottish)", "reproduces the description format"),
    ("Gender: Female, Accent: Scottish.", "reproduces the description format"),
    ("A Scottish woman with a high pitch.", "names 2 fields not asked about (accent, pitch)"),
])
def test_an_echo_of_the_description_scores_zero_and_says_so(answer, reason):
    result = score_item(item("gender", "Female", choices=GENDERS), answer)
    assert result == {"score": 0.0, "reason": f"echo: {reason}"}


def test_one_other_field_named_is_not_an_echo():
    assert score_item(item("gender", "Female", choices=GENDERS), "A woman with a Scottish accent.")["score"] == 1.0
    assert score_item(item("gender", "yes", style="yesno"), "Yes, a woman speaking slowly.")["score"] == 1.0


@pytest.mark.parametrize("answer, category, gold, expected", [
    ("She speaks in a moderate tone.", "volume", "Normal", 0.0),  # "tone" is pitch's word: not a volume answer
    ("The volume is moderate.", "volume", "Normal", 1.0), ("Moderate.", "volume", "Normal", 1.0),
    ("A moderate tone.", "pitch", "Normal", 1.0), ("Quite loud.", "volume", "High", 1.0),
    ("A high-pitched voice at a low volume.", "pitch", "High", 1.0),
    ("A high-pitched voice at a low volume.", "volume", "Low", 1.0),
    ("Deep.", "volume", "Low", 0.0),  # a pitch word never answers volume
])
def test_pitch_and_volume_words_are_disjoint(answer, category, gold, expected):
    assert score_label(answer, gold, ["High", "Low", "Normal"], category).value == expected


def test_a_constant_duration_guess_cannot_pass_half_the_clips():
    durations = np.linspace(0.8, 6.2, 60)  # the synthetic corpus's range of lengths
    best = max(np.mean([score_number(f"{guess} seconds", d).value for d in durations])
               for guess in np.arange(1, 7, 0.5))
    assert best < 0.5
    assert score_number("2 seconds", 1.6).value == 1.0  # what a description rounded to whole seconds says


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
