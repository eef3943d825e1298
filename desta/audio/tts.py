"""Speech synthesis with espeak-ng (package espeakng-loader): labelled speech with no network.

Reads text and voice settings; returns 16 kHz mono float32 samples. The synthetic corpus, the
tiny default and the tests all get their audio here.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np

from desta.audio import SAMPLE_RATE
from desta.core.args import raise_problems

# espeak-ng's C API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4

# English accents that espeak-ng ships, by the name a description uses.
ACCENTS = {
    "American": "en-us",
    "British": "en-gb-x-rp",
    "Scottish": "en-gb-scotland",
    "Caribbean": "en-029",
    "Northern English": "en-gb-x-gbclan",
    "West Midlands": "en-gb-x-gbcwmd",
}
# Voice variants by gender (espeak-ng-data/voices/!v).
VOICES = {"Female": ["f1", "f2", "f3", "f4"], "Male": ["m1", "m2", "m3", "m4"]}


@dataclass(frozen=True)
class Voice:
    """How espeak-ng speaks: accent, gender variant, rate, pitch and volume."""

    accent: str = "American"  # a key of ACCENTS
    variant: str = "m1"  # a voice variant, e.g. f2 or m3
    rate: int = 170  # words per minute (espeak-ng's default is 175)
    pitch: int = 50  # 0-100, espeak-ng's base pitch scale
    volume: int = 100  # 0-200 amplitude, 100 is espeak-ng's default


_lock = threading.Lock()
_lib = None
_native_rate = 0
_chunks: list[np.ndarray] = []


@ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
def _on_samples(wav: ctypes._Pointer[ctypes.c_short], count: int, _events: int | None) -> int:
    """espeak-ng's synthesis callback: keep `count` 16-bit samples; 0 tells it to go on."""
    if count > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
    return 0


def _library():
    global _lib, _native_rate
    if _lib is None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        data_parent = os.path.dirname(espeakng_loader.get_data_path())
        _native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent.encode(), 0)
        if _native_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {data_parent}")
        lib.espeak_SetSynthCallback(_on_samples)
        _lib = lib
    return _lib


def synthesize(text: str, voice: Voice = Voice()) -> np.ndarray:
    """Speak `text` and return 16 kHz mono float32 samples in [-1, 1].

    espeak-ng keeps pitch-flutter and noise state across utterances inside the process, so the
    same call twice gives the same words, voice and length to within about 1 %, not the same bits.

    >>> y = synthesize("Hello there."); y.dtype, y.ndim
    (dtype('float32'), 1)
    """
    import librosa

    if voice.accent not in ACCENTS:
        raise ValueError(f"unknown accent {voice.accent!r}; choose one of {sorted(ACCENTS)}")
    if not text.strip():
        raise ValueError("cannot synthesize empty text")
    with _lock:  # espeak-ng keeps global state: one utterance at a time per process
        lib = _library()
        name = f"{ACCENTS[voice.accent]}+{voice.variant}".encode()
        if lib.espeak_SetVoiceByName(name) != 0:
            raise ValueError(f"espeak-ng has no voice {name.decode()!r}")
        lib.espeak_SetParameter(_PARAM_RATE, int(voice.rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(voice.pitch), 0)
        lib.espeak_SetParameter(_PARAM_VOLUME, int(voice.volume), 0)
        _chunks.clear()
        encoded = text.encode("utf-8") + b"\0"
        lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        pcm = np.concatenate(_chunks) if _chunks else np.zeros(0, dtype=np.int16)
        _chunks.clear()
    samples = pcm.astype(np.float32) / 32768.0
    return librosa.resample(samples, orig_sr=_native_rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")


@dataclass
class TTSConfig:
    """Speak text to a 16 kHz WAV file with espeak-ng."""

    POSITIONAL = ("text",)
    text: str
    """what to say"""
    out: str = "speech.wav"
    """output WAV path"""
    accent: str = "American"
    """English accent: American, British, Scottish, Caribbean, Northern English, West Midlands"""
    variant: str = "m1"
    """voice variant: f1-f4 (female), m1-m4 (male)"""
    rate: int = 170
    """words per minute"""
    pitch: int = 50
    """base pitch, 0-100"""
    volume: int = 100
    """amplitude, 0-200"""

    def __post_init__(self) -> None:
        problems = []
        if self.accent not in ACCENTS:
            problems.append(("accent", f"choose one of {sorted(ACCENTS)}, got {self.accent!r}"))
        if self.variant not in VOICES["Female"] + VOICES["Male"]:
            problems.append(("variant", f"choose one of {VOICES['Female'] + VOICES['Male']}, got {self.variant!r}"))
        if not (0 <= self.pitch <= 100 and 0 <= self.volume <= 200 and 20 <= self.rate <= 600):
            problems.append(("rate", "rate must be 20-600 words per minute, pitch 0-100, volume 0-200"))
        raise_problems(problems)


def speak(config: TTSConfig) -> float:
    """Write the WAV file; returns its duration in seconds."""
    import soundfile as sf

    samples = synthesize(config.text, Voice(accent=config.accent, variant=config.variant, rate=config.rate,
                                            pitch=config.pitch, volume=config.volume))
    sf.write(config.out, samples, SAMPLE_RATE)
    return len(samples) / SAMPLE_RATE
