"""Speech synthesis with espeak-ng: repeatable, and it follows the voice settings."""

import numpy as np
import pytest

from desta.audio import SAMPLE_RATE
from desta.audio.tts import Voice, synthesize


def test_tts_repeats_closely_and_follows_pitch():
    import librosa

    low = synthesize("Good morning everyone.", Voice(variant="m1", pitch=20))
    again = synthesize("Good morning everyone.", Voice(variant="m1", pitch=20))
    assert abs(len(again) - len(low)) <= 0.01 * len(low)
    high = synthesize("Good morning everyone.", Voice(variant="m1", pitch=80))

    def median_f0(y):
        f0, voiced, _ = librosa.pyin(y, fmin=60, fmax=500, sr=SAMPLE_RATE)
        return np.nanmedian(f0[voiced])

    assert median_f0(high) > 1.2 * median_f0(low)
    with pytest.raises(ValueError, match="unknown accent"):
        synthesize("hi", Voice(accent="Martian"))
