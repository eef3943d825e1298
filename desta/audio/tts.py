"""Speech synthesis: labelled speech with no network, from four engines (espeak-ng, MBROLA, flite, piper).

Reads text, a catalogue voice (desta.audio.voices) and its settings (rate, pitch, volume); returns 16 kHz
mono float32 samples. The synthetic corpus, the tiny default and the tests all get their audio here.

The settings mean the same for every engine. Rate is in words per minute: espeak-ng and MBROLA (driven by
espeak-ng) take it as it is; flite and piper stretch their durations by NOMINAL_WPM / rate. Pitch is on
espeak-ng's 0-100 scale: espeak-ng and MBROLA take it as it is; the others multiply their F0 by
2 ** ((pitch - 50) / PITCH_STEPS_PER_OCTAVE) (flite natively, piper and flite's rms voice by shifting the
output's pitch). Volume is 0-200: espeak-ng's amplitude; the other engines' output is scaled to a peak of
REFERENCE_PEAK x volume / 100 (MBROLA saturates at espeak-ng's higher amplitudes, so it is not asked for them).
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from desta.audio import SAMPLE_RATE
from desta.audio.voices import (
    CATALOGUE,
    ESPEAK_ACCENTS,
    ESPEAK_VARIANTS,
    PIPER_VOICES,
    VoiceInfo,
    espeak_id,
    require,
    system_espeak_data,
    system_espeak_library,
)
from desta.core.args import raise_problems
from desta.core.extras import require_extra
from desta.core.summary import Summary

ACCENTS = ESPEAK_ACCENTS  # the espeak-ng accents `Voice(accent=...)` takes
VOICES = ESPEAK_VARIANTS  # the espeak-ng variants `Voice(variant=...)` takes, by gender

# espeak-ng's C API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4

NOMINAL_WPM = 175  # espeak-ng's default rate: flite and piper at their own default speed count as this
# Pitch steps per octave for engines without espeak-ng's scale: measured on espeak-ng's en-us+m1, pitch 10 / 90
# give 0.74x / 1.52x the F0 of pitch 50 (2-core x86_64 CPU, AMD EPYC), about +-0.5 octave over +-40 steps.
PITCH_STEPS_PER_OCTAVE = 80
REFERENCE_PEAK = 0.45  # peak of flite, piper and MBROLA output at volume 100 (0.9 at volume 200: no clipping)
MBROLA_AMPLITUDE = 60  # espeak-ng's amplitude for MBROLA voices: at 100 mbrola saturates on loud phones
FLITE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Voice:
    """Who speaks and how: a catalogue voice (or an espeak-ng accent and variant), rate, pitch and volume."""

    accent: str = "American"  # espeak-ng only: a key of ACCENTS
    variant: str = "m1"  # espeak-ng only: a voice variant, e.g. f2 or m3
    rate: int = 170  # words per minute (espeak-ng's default is 175)
    pitch: int = 50  # 0-100, espeak-ng's base pitch scale
    volume: int = 100  # 0-200 amplitude, 100 is espeak-ng's default
    voice_id: str | None = None  # any catalogue voice (mbrola:mb-us1, flite:slt, ...); set, accent and variant go

    @property
    def id(self) -> str:
        """The catalogue id of the voice that speaks."""
        if self.voice_id is not None:
            return self.voice_id
        if self.accent not in ACCENTS:
            raise ValueError(f"unknown accent {self.accent!r}; choose one of {sorted(ACCENTS)}")
        return espeak_id(self.accent, self.variant)


class _EspeakLibrary:
    """One loaded libespeak-ng: espeak-ng keeps global state, so each library has its own lock and buffer."""

    def __init__(self, path: Path, data_parent: Path | None):
        self.lock = threading.Lock()
        self.chunks: list[np.ndarray] = []
        self.lib = ctypes.CDLL(str(path))  # by full path: the pip build and Debian's share a soname
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_ng_GetSampleRate.restype = ctypes.c_int
        if self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                      str(data_parent).encode() if data_parent else None, 0) <= 0:
            raise RuntimeError(f"espeak-ng ({path}) failed to initialise with data at {data_parent}")

        @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        def on_samples(wav: ctypes._Pointer[ctypes.c_short], count: int, _events: int | None) -> int:
            """The synthesis callback: keep `count` 16-bit samples; 0 tells espeak-ng to go on."""
            if count > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0

        self.callback = on_samples  # kept referenced: the library calls it for as long as it lives
        self.lib.espeak_SetSynthCallback(on_samples)

    def speak(self, text: str, name: str, rate: int, pitch: int, volume: int) -> tuple[np.ndarray, int]:
        """(int16 samples, their sample rate): the rate is the voice's (16000 for most MBROLA voices), which
        espeak_ng_GetSampleRate reports after the voice is set, while espeak_Initialize reports 22050."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {name!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_PARAM_VOLUME, int(volume), 0)
            self.chunks.clear()
            encoded = text.encode("utf-8") + b"\0"
            self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)
            self.chunks.clear()
            return pcm, self.lib.espeak_ng_GetSampleRate()


@functools.lru_cache(maxsize=1)
def _bundled_espeak() -> _EspeakLibrary:
    """espeak-ng as the espeakng-loader package ships it: every espeak voice, no MBROLA."""
    import espeakng_loader

    return _EspeakLibrary(Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path()).parent)


@functools.lru_cache(maxsize=1)
def _system_espeak() -> _EspeakLibrary:
    """Debian's libespeak-ng, which drives MBROLA voices (it runs the `mbrola` program)."""
    data = system_espeak_data()
    return _EspeakLibrary(system_espeak_library(), data.parent if data else None)


def _flite(text: str, voice: VoiceInfo, rate: int, factor: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "speech.wav")
        command = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={NOMINAL_WPM / rate:.4f}",
                   "-t", text, "-o", out]
        if voice.native_pitch:
            command[5:5] = ["--setf", f"f0_shift={factor:.4f}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=FLITE_TIMEOUT_S)
        if done.returncode != 0 or not os.path.isfile(out):
            raise RuntimeError(f"flite failed for voice {voice.name!r}: {done.stderr.strip()[:300]}")
        samples, rate_hz = sf.read(out, dtype="float32")
    return samples, rate_hz


@functools.lru_cache(maxsize=2)
def _piper_voice(name: str):  # noqa: ANN202 - a piper.PiperVoice, imported only when piper is used
    import importlib

    require_extra("voices", f"the piper voice {name!r}")
    from piper import PiperVoice

    package = importlib.import_module(PIPER_VOICES[name][2])
    return PiperVoice.load(package.model_path(), config_path=package.config_path())


def _piper(text: str, voice: VoiceInfo, rate: int) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    model = _piper_voice(voice.name)
    base = model.config.length_scale or 1.0
    chunks = list(model.synthesize(text, syn_config=SynthesisConfig(length_scale=base * NOMINAL_WPM / rate)))
    samples = np.concatenate([c.audio_float_array for c in chunks]) if chunks else np.zeros(0, np.float32)
    return samples, model.config.sample_rate


def pitch_factor(pitch: int) -> float:
    """The F0 multiplier a pitch setting stands for on engines without espeak-ng's scale.

    >>> pitch_factor(50), pitch_factor(90)
    (1.0, 1.4142135623730951)
    """
    return 2 ** ((pitch - 50) / PITCH_STEPS_PER_OCTAVE)


def synthesize(text: str, voice: Voice = Voice()) -> np.ndarray:
    """Speak `text` and return 16 kHz mono float32 samples in [-1, 1].

    espeak-ng keeps pitch-flutter and noise state across utterances inside the process, so the
    same call twice gives the same words, voice and length to within about 1 %, not the same bits.

    >>> y = synthesize("Hello there."); y.dtype, y.ndim
    (dtype('float32'), 1)
    """
    import librosa

    if voice.id not in CATALOGUE:
        raise ValueError(f"unknown voice {voice.id!r}; `desta voices` lists the catalogue")
    if not text.strip():
        raise ValueError("cannot synthesize empty text")
    info = CATALOGUE[voice.id]
    require([info])
    normalise = True
    if info.engine == "espeak":
        pcm, rate_hz = _bundled_espeak().speak(text, info.name, voice.rate, voice.pitch, voice.volume)
        samples, normalise = pcm.astype(np.float32) / 32768.0, False
    elif info.engine == "mbrola":
        pcm, rate_hz = _system_espeak().speak(text, info.name, voice.rate, voice.pitch, MBROLA_AMPLITUDE)
        samples = pcm.astype(np.float32) / 32768.0
    elif info.engine == "flite":
        samples, rate_hz = _flite(text, info, voice.rate, pitch_factor(voice.pitch))
    else:
        samples, rate_hz = _piper(text, info, voice.rate)
    if not info.native_pitch and voice.pitch != 50:
        steps = 12 * np.log2(pitch_factor(voice.pitch))  # semitones
        samples = librosa.effects.pitch_shift(samples, sr=rate_hz, n_steps=float(steps))
    if rate_hz != SAMPLE_RATE:
        samples = librosa.resample(samples, orig_sr=rate_hz, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if normalise and peak > 0:
        samples = samples * (REFERENCE_PEAK * voice.volume / 100 / peak)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


@dataclass
class TTSConfig:
    """Speak text to a 16 kHz WAV file with any catalogue voice (`desta voices` lists them)."""

    POSITIONAL = ("text",)
    text: str
    """what to say"""
    out: str = "speech.wav"
    """output WAV path"""
    voice: str | None = None
    """a catalogue voice id (espeak:en-us+f3, mbrola:mb-us1, flite:slt, piper:en_US-joe-medium); null: the
    espeak-ng accent and variant below"""
    accent: str = "American"
    """espeak-ng's English accent: American, British, Scottish, Caribbean, Northern English, West Midlands"""
    variant: str = "m1"
    """espeak-ng's voice variant: f1-f4 (female), m1-m4 (male)"""
    rate: int = 170
    """words per minute"""
    pitch: int = 50
    """base pitch, 0-100"""
    volume: int = 100
    """amplitude, 0-200"""

    def __post_init__(self) -> None:
        problems = []
        if self.voice is not None and self.voice not in CATALOGUE:
            problems.append(("voice", f"unknown voice {self.voice!r}; `desta voices` lists the catalogue"))
        if self.accent not in ACCENTS:
            problems.append(("accent", f"choose one of {sorted(ACCENTS)}, got {self.accent!r}"))
        if self.variant not in VOICES["Female"] + VOICES["Male"]:
            problems.append(("variant", f"choose one of {VOICES['Female'] + VOICES['Male']}, got {self.variant!r}"))
        if not (0 <= self.pitch <= 100 and 0 <= self.volume <= 200 and 20 <= self.rate <= 600):
            problems.append(("rate", "rate must be 20-600 words per minute, pitch 0-100, volume 0-200"))
        raise_problems(problems)


def speak(config: TTSConfig) -> Summary:
    """Write the WAV file; returns its duration in seconds."""
    import soundfile as sf

    samples = synthesize(config.text, Voice(accent=config.accent, variant=config.variant, rate=config.rate,
                                            pitch=config.pitch, volume=config.volume, voice_id=config.voice))
    sf.write(config.out, samples, SAMPLE_RATE)
    seconds = len(samples) / SAMPLE_RATE
    return Summary({"out": config.out, "seconds": seconds}, f"wrote {config.out}: {seconds:.2f} s")
