"""Audio constants and helpers shared by every stage: load, validate, window.

Reads audio files or arrays; returns mono float32 at 16 kHz, checked, and cut into
Whisper-sized windows. No torchaudio (its CPU build is not installable everywhere, and a CUDA build
breaks `import transformers` on a machine without CUDA): soundfile decodes, librosa/soxr resample.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000  # Hz, what Whisper was trained on
HOP_LENGTH = 160  # samples between mel frames: 10 ms
WINDOW_SECONDS = 30  # Whisper's context
N_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000 samples in one 30 s window
FRAMES_PER_ENCODER_STEP = 2  # the encoder's second convolution has stride 2: 1500 steps per window
SILENCE_PEAK = 1e-4  # a clip whose absolute peak stays under this is treated as silent (-80 dBFS)


class AudioError(ValueError):
    """Audio that cannot be used; the message names the input and the fix."""


def validate_audio(samples: np.ndarray, sampling_rate: int, name: str = "audio") -> np.ndarray:
    """Check a mono waveform at 16 kHz and return it as float32.

    >>> validate_audio(np.full(1600, 0.1), 16000).dtype
    dtype('float32')
    """
    if sampling_rate != SAMPLE_RATE:
        raise AudioError(
            f"{name}: expected a sampling rate of {SAMPLE_RATE} Hz, got {sampling_rate} Hz; "
            f"load it with desta.audio.load_audio() or resample it with librosa.resample(y, orig_sr={sampling_rate}, "
            f"target_sr={SAMPLE_RATE})"
        )
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise AudioError(
            f"{name}: expected a mono waveform of shape (samples,), got shape {samples.shape}; "
            "downmix with samples.mean(axis=0) or load it with desta.audio.load_audio()"
        )
    if samples.size == 0:
        raise AudioError(f"{name}: the waveform is empty (0 samples); give a clip of at least one frame")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"{name}: {bad} samples are NaN or infinite; fix or drop this clip")
    if np.abs(samples).max() < SILENCE_PEAK:
        raise AudioError(f"{name}: the clip is silent (peak below {SILENCE_PEAK}); drop this clip")
    return samples.astype(np.float32, copy=False)


def load_audio(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file (path or bytes), downmix to mono, resample to 16 kHz and validate.

    Returns float32 samples of shape (samples,).
    """
    import io

    import librosa
    import soundfile as sf

    name = name or (str(source) if not isinstance(source, bytes) else "audio bytes")
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise AudioError(f"{name}: file not found; check the path")
    try:
        data, rate = sf.read(io.BytesIO(source) if isinstance(source, bytes) else str(source), dtype="float32",
                             always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError / RuntimeError / TypeError for bad content
        raise AudioError(f"{name}: cannot decode audio ({err}); use WAV, FLAC or OGG, or convert with ffmpeg") from err
    samples = data.mean(axis=1)  # (samples, channels) -> (samples,)
    if rate != SAMPLE_RATE and samples.size:
        samples = librosa.resample(samples, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return validate_audio(samples, SAMPLE_RATE, name)


def load_audio_ref(audio: dict, name: str | None = None) -> np.ndarray:
    """Decode an undecoded `datasets` Audio value ({"bytes": ..., "path": ...}): bytes first, else the path."""
    if audio.get("bytes"):
        return load_audio(audio["bytes"], name=name or audio.get("path") or "audio bytes")
    return load_audio(audio.get("path") or "", name=name or audio.get("path") or "missing path")


def split_windows(samples: np.ndarray, window: int = N_SAMPLES) -> list[np.ndarray]:
    """Cut a waveform into consecutive windows of at most `window` samples, in order.

    >>> [len(w) for w in split_windows(np.zeros(45 * SAMPLE_RATE))]
    [480000, 240000]
    """
    return [samples[start : start + window] for start in range(0, len(samples), window)]


def timestamp(seconds: float) -> str:
    """mm:ss, as descriptions write times.

    >>> timestamp(75.4), timestamp(2.6)
    ('01:15', '00:03')
    """
    whole = int(round(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def time_span(seconds: float) -> str:
    """The span a description gives a whole clip, e.g. '[00:00-00:03]'."""
    return f"[{timestamp(0)}-{timestamp(seconds)}]"


def num_windows(num_samples: int, window: int = N_SAMPLES) -> int:
    """How many 30 s windows a clip of `num_samples` needs (at least one)."""
    return max(1, math.ceil(num_samples / window))
