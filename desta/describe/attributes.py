"""Attributes of a clip for its description: measured from the signal, or normalised from labels.

Signal attributes (duration, pitch, volume, speaking speed, signal-to-noise) come from 10 ms
frames of the 16 kHz waveform; label attributes (gender, emotion, age, accent) come from corpus
metadata through `normalize_label`. Every bin threshold is a named constant below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from desta.audio import HOP_LENGTH, SAMPLE_RATE

FRAME_LENGTH = 400  # samples in an energy frame: 25 ms
ACTIVE_RANGE_DB = 35.0  # frames within 35 dB of the loudest frame count as speech activity
VOICED_RANGE_DB = 20.0  # frames within 20 dB of the loudest frame are used for pitch
FLOOR_DBFS = -60.0  # never call a frame active below this level
F0_MIN_HZ, F0_MAX_HZ = 60.0, 500.0  # search range of the YIN pitch tracker
F0_FRAME = 1024  # YIN window: 64 ms, two periods of 60 Hz

# Pitch bins (median F0 in Hz) relative to the speaker's gender: (below -> Low, above -> High).
# Adult speech: men ~85-155 Hz (mean ~115), women ~165-255 Hz (mean ~205).
PITCH_BINS_HZ = {"Male": (85.0, 125.0), "Female": (165.0, 235.0), None: (110.0, 200.0)}
# Volume bins on the RMS level of active speech, dBFS: below -26 Low, above -18 High.
VOLUME_BINS_DBFS = (-26.0, -18.0)
# Speaking speed bins, words per second of active speech (pauses excluded): below 3.0 Slow, above 4.5 Fast.
SPEED_BINS_WPS = (3.0, 4.5)
# Signal-to-noise bins, dB: below 15 Noisy, above 30 Clean, else Moderate.
SNR_BINS_DB = (15.0, 30.0)


@dataclass
class SignalMeasures:
    """What `measure` reads from a clip's waveform, before binning into words."""

    duration: float  # seconds
    active_seconds: float  # seconds of speech activity (energy within ACTIVE_RANGE_DB of the peak)
    f0_hz: float | None  # median F0 of voiced frames; None if nothing voiced
    level_dbfs: float  # RMS level of active frames
    snr_db: float  # loudest half of frames vs quietest tenth


def measure(samples: np.ndarray) -> SignalMeasures:
    """Measure a 16 kHz mono clip.

    >>> t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    >>> m = measure(0.1 * np.sin(2 * np.pi * 150 * t).astype(np.float32))
    >>> round(m.duration, 2), round(m.f0_hz, -1), round(m.level_dbfs)
    (1.0, 150.0, -23)
    """
    import librosa

    rms = librosa.feature.rms(y=samples, frame_length=FRAME_LENGTH, hop_length=HOP_LENGTH, center=True)[0]
    db = 20 * np.log10(np.maximum(rms, 1e-10))  # (frames,)
    peak = db.max()
    active = db > max(peak - ACTIVE_RANGE_DB, FLOOR_DBFS)
    f0 = librosa.yin(samples, fmin=F0_MIN_HZ, fmax=F0_MAX_HZ, sr=SAMPLE_RATE, frame_length=F0_FRAME,
                     hop_length=HOP_LENGTH)
    frames = min(len(f0), len(db))
    voiced = active[:frames] & (db[:frames] > peak - VOICED_RANGE_DB)
    power = rms**2
    ordered = np.sort(power)
    loud, quiet = ordered[len(ordered) // 2 :].mean(), ordered[: max(1, len(ordered) // 10)].mean()
    return SignalMeasures(
        duration=len(samples) / SAMPLE_RATE,
        active_seconds=float(active.sum()) * HOP_LENGTH / SAMPLE_RATE,
        f0_hz=float(np.median(f0[:frames][voiced])) if voiced.any() else None,
        level_dbfs=float(10 * np.log10(max(power[active].mean(), 1e-20))),
        snr_db=float(10 * np.log10(max(loud, 1e-20) / max(quiet, 1e-20))),
    )


def _bin(value: float, bounds: tuple[float, float], words: tuple[str, str, str]) -> str:
    low, high = bounds
    return words[0] if value < low else words[2] if value > high else words[1]


def pitch_word(f0_hz: float | None, gender: str | None = None) -> str | None:
    """'Low' / 'Normal' / 'High' relative to the gender's range.

    >>> pitch_word(100, "Male"), pitch_word(100, "Female"), pitch_word(260, None)
    ('Normal', 'Low', 'High')
    """
    if f0_hz is None:
        return None
    return _bin(f0_hz, PITCH_BINS_HZ.get(gender, PITCH_BINS_HZ[None]), ("Low", "Normal", "High"))


def volume_word(level_dbfs: float) -> str:
    """'Low' / 'Normal' / 'High' from the RMS level of active speech (VOLUME_BINS_DBFS).

    >>> volume_word(-30.0), volume_word(-22.0), volume_word(-10.0)
    ('Low', 'Normal', 'High')
    """
    return _bin(level_dbfs, VOLUME_BINS_DBFS, ("Low", "Normal", "High"))


def speed_word(words_per_second: float) -> str:
    """'Slow' / 'Normal' / 'Fast' from words per second of active speech (SPEED_BINS_WPS).

    >>> speed_word(2.0), speed_word(3.5), speed_word(5.0)
    ('Slow', 'Normal', 'Fast')
    """
    return _bin(words_per_second, SPEED_BINS_WPS, ("Slow", "Normal", "Fast"))


def noise_word(snr_db: float) -> str:
    """'Noisy' / 'Moderate' / 'Clean' from the signal-to-noise ratio in dB (SNR_BINS_DB).

    >>> noise_word(10.0), noise_word(20.0), noise_word(40.0)
    ('Noisy', 'Moderate', 'Clean')
    """
    return _bin(snr_db, SNR_BINS_DB, ("Noisy", "Moderate", "Clean"))


def count_words(text: str) -> int:
    """Words in a transcript: runs of letters, digits and apostrophes.

    >>> count_words("It's 5 o'clock, Bob.")
    4
    """
    return len(re.findall(r"[\w']+", text))


# ----- labels from metadata -----

GENDER_LABELS = {
    "Female": ["f", "female", "woman", "w", "girl", "feminine"],
    "Male": ["m", "male", "man", "boy", "masculine"],
}
EMOTION_LABELS = {
    "Neutral": ["neutral", "neu", "n", "calm"],
    "Happy": ["happy", "hap", "h", "joy", "happiness", "exc", "excited"],
    "Sad": ["sad", "sa", "sadness"],
    "Angry": ["angry", "ang", "a", "anger"],
    "Fearful": ["fear", "fea", "fearful", "f"],
    "Disgusted": ["disgust", "dis", "d", "disgusted"],
    "Surprised": ["surprise", "sur", "surprised", "ps"],
    "Frustrated": ["frustrated", "fru", "frustration"],
}
AGE_WORDS = {"teens": "Teenager", "twenties": "Young adult", "thirties": "Young adult", "fourties": "Middle-aged",
             "forties": "Middle-aged", "fifties": "Middle-aged", "sixties": "Senior", "seventies": "Senior",
             "eighties": "Senior", "nineties": "Senior"}
AGE_BINS_YEARS = ((13, "Child"), (20, "Teenager"), (36, "Young adult"), (56, "Middle-aged"))  # else Senior


class LabelError(ValueError):
    """A metadata label outside the known set for its attribute."""


def _lookup(table: dict[str, list[str]], value: str, attribute: str) -> str:
    key = value.strip().lower()
    for word, spellings in table.items():
        if key == word.lower() or key in spellings:
            return word
    raise LabelError(f"unknown {attribute} label {value!r}; known: {sorted(table)} "
                     f"(or their spellings); add it to the corpus mapping's labels")


def normalize_label(attribute: str, value: object, extra: dict[str, str] | None = None) -> str | None:
    """A metadata value as the word a description uses; None for a missing value.

    `extra` maps a corpus's own codes first (e.g. CREMA-D's "HAP" -> "Happy").

    >>> normalize_label("gender", "F"), normalize_label("gender", "woman"), normalize_label("emotion", "ang")
    ('Female', 'Female', 'Angry')
    >>> normalize_label("age", 42), normalize_label("age", "twenties"), normalize_label("accent", "scottish")
    ('Middle-aged', 'Young adult', 'Scottish')
    """
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "nan", "None"):
        return None
    text = str(value).strip()
    if extra:
        lowered = {k.lower(): v for k, v in extra.items()}
        text = lowered.get(text.lower(), text)
    if attribute == "gender":
        return _lookup(GENDER_LABELS, text, "gender")
    if attribute == "emotion":
        return _lookup(EMOTION_LABELS, text, "emotion")
    if attribute == "age":
        if re.fullmatch(r"\d+(\.\d+)?", text):
            years = float(text)
            return next((word for bound, word in AGE_BINS_YEARS if years < bound), "Senior")
        if text.lower() in AGE_WORDS:
            return AGE_WORDS[text.lower()]
        if text in set(AGE_WORDS.values()) | {"Child"}:
            return text
        raise LabelError(f"unknown age label {value!r}; give years or one of {sorted(set(AGE_WORDS))}")
    if attribute == "accent":  # an open set: keep the corpus's word, tidied
        return " ".join(w.capitalize() for w in re.split(r"[\s_]+", text) if w)
    raise LabelError(f"unknown attribute {attribute!r}; one of gender, emotion, age, accent")


# ----- naming labels in text -----

# Words that name each label, per attribute (lowercase, matched on word boundaries). Gender is read from
# gender words only, never from pronouns: "she" may belong to a quoted transcript, not to the answer.
LABEL_WORDS: dict[str, dict[str, list[str]]] = {
    "gender": {"Male": ["male", "man", "masculine", "boy", "gentleman"],
               "Female": ["female", "woman", "feminine", "girl", "lady"]},
    "speaking_speed": {"Slow": ["slow", "slowly", "leisurely", "unhurried"], "Normal": [],
                       "Fast": ["fast", "quick", "quickly", "rapid", "rapidly", "brisk", "hurried"]},
    "pitch": {"Low": ["deep", "low-pitched"], "Normal": [], "High": ["high-pitched", "shrill"]},
    "volume": {"Low": ["quiet", "quietly", "soft", "softly", "faint", "whisper", "whispered", "hushed"], "Normal": [],
               "High": ["loud", "loudly", "booming"]},
}
# Level words several fields share: they name a field's label only in that field's context, the field noun
# nearest to them being its own ("a low pitch", "the volume is moderate"), or, when `bare_levels`, in an answer
# that names no field at all ("Moderate."). So "a moderate tone" answers a pitch question, not a volume one.
LEVEL_WORDS: dict[str, list[str]] = {"Low": ["low", "lower"], "High": ["high", "higher"],
                                     "Normal": ["normal", "moderate", "medium", "average", "mid", "regular"]}
LEVEL_FIELDS = {"pitch": {"Low": "Low", "Normal": "Normal", "High": "High"},
                "volume": {"Low": "Low", "Normal": "Normal", "High": "High"},
                "speaking_speed": {"Normal": "Normal"}}  # level -> label; slow and fast are speed's own words
FIELD_NOUNS = {"pitch": ["pitch", "pitched", "tone", "register"], "volume": ["volume", "loudness"],
               "speaking_speed": ["pace", "speed", "rate", "tempo", "rhythm"]}


def _mentions(answer: str, words: list[str]) -> list[int]:
    text = answer.lower()
    return [m.start() for w in words for m in re.finditer(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text)]


def _levels_named(answer: str, attribute: str, bare_levels: bool) -> set[str]:
    """The labels of `attribute` its level words name in context (see LEVEL_WORDS)."""
    nouns = [(at, field) for field, words in FIELD_NOUNS.items() for at in _mentions(answer, words)]
    named = set()
    for level, label in LEVEL_FIELDS.get(attribute, {}).items():
        for at in _mentions(answer, LEVEL_WORDS[level]):
            if not nouns:
                if bare_levels:
                    named.add(label)
            elif min(nouns, key=lambda noun: abs(noun[0] - at))[1] == attribute:
                named.add(label)
    return named


def named_labels(answer: str, labels: list[str], attribute: str | None = None, bare_levels: bool = True) -> set[str]:
    """The labels of the set an answer names, by the label itself or a word for it; a level word shared by
    pitch, volume and speed ("low", "moderate") counts only in its field's context (`bare_levels`: also in an
    answer that names no field).

    >>> sorted(named_labels("A woman, calm.", ["Female", "Male"], "gender"))
    ['Female']
    >>> named_labels("She says hello.", ["Female", "Male"], "gender")  # a pronoun is not an answer
    set()
    >>> named_labels("A moderate tone.", ["Low", "Normal", "High"], "volume")
    set()
    >>> named_labels("Low.", ["Low", "High"], "volume")
    {'Low'}
    """
    words = LABEL_WORDS.get(attribute or "", {})
    levels = {w for ws in LEVEL_WORDS.values() for w in ws} if attribute in LEVEL_FIELDS else set()
    named = {label for label in labels
             if _mentions(answer, [w for w in [label.lower(), *words.get(label, [])] if w not in levels])}
    if attribute in LEVEL_FIELDS:
        named |= _levels_named(answer, attribute, bare_levels) & set(labels)
    return named
