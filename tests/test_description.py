"""The description format: what describe writes is what the eval reads back."""

import pytest

from desta.describe.description import DESCRIPTION_NAMES, format_description, parse_description, with_transcript


@pytest.mark.parametrize("segments", [
    [(0.0, 2.2, "Excuse me?")],
    [(0.0, 30.0, "The first window's words."), (30.0, 41.5, "And the second one's.")],
    [(0.0, 1.0, "")],
])
def test_what_format_writes_parse_reads_back(segments):
    attributes = {"gender": "Female", "emotion": "Neutral", "accent": "Scottish", "age": "30s", "pitch": "High",
                  "volume": "Low", "speaking_speed": "Slow", "noise": "Clean", "duration": "2s"}
    for shown in (list(DESCRIPTION_NAMES), ["gender", "duration"], []):
        text = format_description(segments, attributes, shown)
        parsed_segments, parsed = parse_description(text)
        assert parsed == {name: attributes[name] for name in DESCRIPTION_NAMES if name in shown}
        assert [s[2] for s in parsed_segments] == [s[2] for s in segments]
        assert len(parsed_segments) == len(segments)


def test_the_asr_reference_swaps_only_the_transcript():
    text = format_description([(0.0, 30.0, "One."), (30.0, 41.5, "Two.")], {"gender": "Male"}, ["gender"])
    swapped = with_transcript(text, "one two")
    assert swapped == "[00:00-00:42] one two (Gender: Male)"  # 41.5 s: stamps round to the second
    assert parse_description(swapped)[1] == parse_description(text)[1]


def test_a_foreign_description_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match="expected lines like"):
        parse_description("Speaker: female, says hello")
