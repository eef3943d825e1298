"""The description format, written and read in one place: one line per segment, the attributes in brackets.

    [00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, Pitch: High, Volume: Low, Speaking speed: Slow, Duration: 2s)

The describe stage writes it (`format_description`); the eval's text-ASR reference reads it back to put
Whisper's transcript in place of the gold one (`with_transcript`). `parse_description` is the inverse of
`format_description` for every description desta writes.
"""  # noqa: E501

from __future__ import annotations

import re

from desta.audio import timestamp

# How each attribute is named inside a description, in the order it appears.
DESCRIPTION_NAMES = {"gender": "Gender", "emotion": "Emotion", "accent": "Accent", "age": "Age", "pitch": "Pitch",
                     "volume": "Volume", "speaking_speed": "Speaking speed", "noise": "Noise",
                     "duration": "Duration"}
_NAMES_BACK = {shown: name for name, shown in DESCRIPTION_NAMES.items()}
# a line: its time span, then (lazily, so an empty transcript leaves the brackets to the attributes) its text
_LINE = re.compile(r"^\[(\d\d:\d\d)-(\d\d:\d\d)\](?: (.*?))??(?: \(([^()]*)\))?$")


def format_description(segments: list[tuple[float, float, str]], attributes: dict[str, str | None],
                       shown: list[str]) -> str:
    """The DeSTA2.5 description: one line per segment, the `shown` attributes that have a value in brackets.

    >>> format_description([(0.0, 2.2, "Excuse me?")], {"gender": "Female", "emotion": "Neutral",
    ...     "accent": "British", "pitch": "High", "volume": "Low", "speaking_speed": "Slow", "duration": "2s"},
    ...     ["gender", "emotion", "accent", "pitch", "volume", "speaking_speed", "duration"])
    '[00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, Pitch: High, Volume: Low, \
Speaking speed: Slow, Duration: 2s)'
    """
    order = [name for name in DESCRIPTION_NAMES if name in shown and attributes.get(name)]
    brackets = ", ".join(f"{DESCRIPTION_NAMES[name]}: {attributes[name]}" for name in order)
    lines = []
    for start, end, text in segments:
        lines.append(" ".join(part for part in (f"[{timestamp(start)}-{timestamp(end)}]", text,
                                                f"({brackets})" if brackets else "") if part))
    return "\n".join(lines)


def parse_description(description: str) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(segments as (start, end, text) with their mm:ss stamps, attributes by field name) of a description.

    >>> parse_description("[00:00-00:02] Excuse me? (Gender: Female, Speaking speed: Slow)")
    ([('00:00', '00:02', 'Excuse me?')], {'gender': 'Female', 'speaking_speed': 'Slow'})
    """
    lines = [_LINE.match(line) for line in description.strip().splitlines()]
    if not lines or not all(lines):
        raise ValueError(f"cannot read description {description[:80]!r}; expected lines like "
                         "'[00:00-00:02] text (Attribute: value, ...)' as desta describe writes them")
    segments = [(m.group(1), m.group(2), m.group(3) or "") for m in lines]
    attributes: dict[str, str] = {}
    for pair in filter(None, (lines[0].group(4) or "").split(", ")):
        shown, _, value = pair.partition(": ")
        attributes[_NAMES_BACK.get(shown, shown.lower().replace(" ", "_"))] = value
    return segments, attributes


def with_transcript(description: str, transcript: str) -> str:
    """The description with its transcript replaced (one segment spanning the clip; attributes kept).

    >>> with_transcript("[00:00-00:03] Hello there. (Gender: Male, Duration: 3s)", "hello the air")
    '[00:00-00:03] hello the air (Gender: Male, Duration: 3s)'
    """
    segments, _ = parse_description(description)
    brackets = _LINE.match(description.strip().splitlines()[0]).group(4)
    return f"[{segments[0][0]}-{segments[-1][1]}] {transcript.strip()}" + (f" ({brackets})" if brackets else "")
