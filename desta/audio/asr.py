"""Speech recognition with Whisper: used by describe (transcripts) and by DestaModel at inference.

Backends: transformers (default, batched over 30 s windows), openai-whisper, faster-whisper
(optional extra). All take 16 kHz mono float32 clips and return one transcript per clip.
Silero VAD gates them, as DeSTA2.5 does: a clip (or 30 s window) without speech gets an empty
transcript instead of what Whisper hallucinates for noise ("You") or a tone ("Beeping").
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from transformers import PreTrainedConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from desta.audio import SAMPLE_RATE, split_windows

if TYPE_CHECKING:
    from whisper.tokenizer import Tokenizer


class Transcriber(Protocol):
    """What every ASR backend offers: a name, and clips in, one transcript per clip out."""

    name: str

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """16 kHz mono float32 clips, each (samples,) -> one transcript per clip, in order."""


def whisper_text_tokenizer(whisper_config: PreTrainedConfig) -> Tokenizer:
    """openai-whisper's tokenizer (ships its vocabulary, works offline) for decoding transcripts."""
    from whisper.tokenizer import get_tokenizer

    multilingual = whisper_config.vocab_size >= 51865
    return get_tokenizer(multilingual=multilingual, num_languages=whisper_config.vocab_size - 51765 - int(multilingual))


# Silero VAD's model keeps state between calls (get_speech_timestamps resets and feeds it chunk by chunk): two threads
# inside it at once (a server's requests) crash the process. One call at a time; a call takes milliseconds.
_VAD_LOCK = threading.Lock()


@functools.cache
def _silero_vad() -> torch.nn.Module:
    """Silero VAD's model, shipped inside the silero-vad package (no download)."""
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad  # importing it sets torch to one thread for the whole process

    torch.set_num_threads(threads)
    return load_silero_vad()


def has_speech(clip: np.ndarray) -> bool:
    """Whether Silero VAD finds speech in a 16 kHz mono clip (its defaults: threshold 0.5, at least 250 ms),
    the test DeSTA2.5 runs before transcribing."""
    from silero_vad import get_speech_timestamps

    samples = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
    with _VAD_LOCK:
        return bool(get_speech_timestamps(samples, _silero_vad(), sampling_rate=SAMPLE_RATE))


def speech_only(transcribe: Callable[[list[np.ndarray]], list[str]], clips: list[np.ndarray]) -> list[str]:
    """`transcribe` on the clips where VAD finds speech; "" for the others."""
    speech = [has_speech(clip) for clip in clips]
    texts = iter(transcribe([clip for clip, found in zip(clips, speech, strict=True) if found]) if any(speech) else [])
    return [next(texts) if found else "" for found in speech]


@torch.no_grad()
def transcribe_windows(whisper: WhisperForConditionalGeneration, feature_extractor: WhisperFeatureExtractor,
                       clips: list[np.ndarray], max_new_tokens: int = 128, batch_size: int = 16,
                       vad: bool = True) -> list[str]:
    """Transcribe clips with a transformers Whisper: each 30 s window decoded greedily, batched; windows joined.
    With `vad`, windows where Silero VAD finds no speech are not decoded and read ""."""
    windows = [split_windows(clip) for clip in clips]
    flat = [w for clip in windows for w in clip]
    decode = functools.partial(_decode, whisper, feature_extractor, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    pieces = iter(speech_only(decode, flat) if vad else decode(flat))
    return [" ".join(p for p in (next(pieces) for _ in clip) if p).strip() for clip in windows]


class _WhisperOwnArguments(logging.Filter):
    """Drops transformers' warning that generate got a generation config "together with" suppress_tokens and
    begin_suppress_tokens: Whisper's own generate passes those itself, whatever its caller does."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that warning only."""
        message = record.getMessage()
        return not (message.startswith("Passing `generation_config` together with generation-related arguments")
                    and "suppress_tokens" in message)


logging.getLogger("transformers.generation.utils").addFilter(_WhisperOwnArguments())


def _decode(whisper: WhisperForConditionalGeneration, feature_extractor: WhisperFeatureExtractor,
            flat: list[np.ndarray], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy Whisper decoding of windows (each at most 30 s), batched: one text per window."""
    tokenizer = whisper_text_tokenizer(whisper.config)
    generation_config = copy.deepcopy(whisper.generation_config)
    # Whisper's generate reads max_length as new tokens after its prompt; a max_new_tokens beside the config's own
    # max_length (448, the decoder's limit) gives the same transcript and a warning about the two limits
    generation_config.max_length, generation_config.max_new_tokens = max_new_tokens, None
    texts: list[str] = []
    for start in range(0, len(flat), batch_size):
        features = feature_extractor(flat[start : start + batch_size], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        mel = features.input_features.to(whisper.device, whisper.dtype)  # (windows, mel_bins, 3000)
        mask = torch.ones(mel.shape[0], mel.shape[-1], dtype=torch.long, device=whisper.device)
        ids = whisper.generate(mel, attention_mask=mask, generation_config=generation_config)
        # every special token of Whisper's vocabulary comes at or after end-of-text (50256 English, 50257 multilingual)
        texts += [tokenizer.decode([t for t in row.tolist() if t < tokenizer.eot]).strip() for row in ids]
    return texts


class TransformersWhisper:
    """Batched Whisper through transformers (the default backend)."""

    name = "transformers"

    def __init__(self, model: str, device: str | None = None, batch_size: int = 16, max_new_tokens: int = 128,
                 vad: bool = True):
        self.model_id, self.vad = model, vad
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.whisper = WhisperForConditionalGeneration.from_pretrained(model, dtype=dtype).to(self.device).eval()
        try:
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(model)
        except OSError:
            self.feature_extractor = WhisperFeatureExtractor(feature_size=self.whisper.config.num_mel_bins)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """Clips, each (samples,) at 16 kHz -> one transcript per clip (30 s windows decoded greedily, joined)."""
        return transcribe_windows(self.whisper, self.feature_extractor, clips, self.max_new_tokens, self.batch_size,
                                  vad=self.vad)


class OpenAIWhisper:
    """openai-whisper's own decoder (model name such as "tiny.en", or a .pt checkpoint path)."""

    name = "openai-whisper"

    def __init__(self, model: str, device: str | None = None, vad: bool = True, **_: object):
        import whisper

        self.model_id, self.vad = model, vad
        self.model = whisper.load_model(model, device=device)

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """Clips, each (samples,) at 16 kHz -> one English transcript per clip, one clip at a time ("" where VAD
        finds no speech)."""
        def transcribe(speech: list[np.ndarray]) -> list[str]:
            return [self.model.transcribe(clip, language="en", fp16=False)["text"].strip() for clip in speech]

        return speech_only(transcribe, clips) if self.vad else transcribe(clips)


class FasterWhisper:
    """CTranslate2 Whisper through faster-whisper (`pip install desta[faster-whisper]`)."""

    name = "faster-whisper"

    def __init__(self, model: str, device: str | None = None, vad: bool = True, **_: object):
        try:
            from faster_whisper import WhisperModel
        except ImportError as err:
            raise ImportError("the faster-whisper backend needs `pip install faster-whisper`") from err
        self.model_id, self.vad = model, vad
        self.model = WhisperModel(model, device=device or "auto", compute_type="default")

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """Clips, each (samples,) at 16 kHz -> one English transcript per clip (greedy, segments joined; "" where
        VAD finds no speech)."""
        def transcribe(speech: list[np.ndarray]) -> list[str]:
            out = []
            for clip in speech:
                segments, _ = self.model.transcribe(clip, language="en", beam_size=1)
                out.append(" ".join(s.text.strip() for s in segments).strip())
            return out

        return speech_only(transcribe, clips) if self.vad else transcribe(clips)


BACKENDS = {b.name: b for b in (TransformersWhisper, OpenAIWhisper, FasterWhisper)}


def make_transcriber(backend: str, model: str, **kwargs: object) -> Transcriber:
    """An ASR backend by name (transformers, openai-whisper or faster-whisper) loaded with `model`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown ASR backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](model, **kwargs)
