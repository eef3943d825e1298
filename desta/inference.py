"""Answering one conversation at a time, streamed or not: the engines behind `desta chat`, `desta serve`
and the web app. A DestaEngine hears audio parts (Whisper transcribes them first); a TextEngine is
a plain chat LLM. Both stop at the same end-of-turn tokens the rest of desta uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from desta.core.generation import Generation, SamplingSettings, TransformersBackend, finish_generation, generate_kwargs
from desta.core.sequences import end_of_turn_ids

if TYPE_CHECKING:
    from desta.modeling import DestaModel
    from desta.processing import DestaProcessor


class TextEngine:
    """A plain chat LLM."""

    accepts_audio = False

    def __init__(self, backend: TransformersBackend, model_id: str):
        self.backend, self.model_id = backend, model_id
        self.audio_token = None

    def generate(self, messages: list[dict], audios: list[np.ndarray],
                 settings: SamplingSettings) -> tuple[Generation, int]:
        """The answer and the prompt's length in tokens."""
        return self.backend.generate([messages], settings)[0], len(self.backend.encode(messages))

    def stream(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings) -> Iterator[str]:
        """Yield text pieces of the answer as they are generated (a text model: `audios` is not used)."""
        yield from self.backend.stream(messages, settings)


class DestaEngine:
    """A DeSTA speech LLM: audio parts become placeholders filled by the connector."""

    accepts_audio = True

    def __init__(self, model: DestaModel, processor: DestaProcessor, model_id: str):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.audio_token = processor.audio_token
        self.eos_ids = end_of_turn_ids(processor.tokenizer, model.llm.generation_config)

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Clips, each (samples,) at 16 kHz -> one Whisper transcript per clip ([] for no clips)."""
        return self.model.transcribe(self.processor, audios) if audios else []

    def _inputs(self, messages: list[dict], audios: list[np.ndarray], transcripts: list[str] | None = None):
        if audios and transcripts is None:
            transcripts = self.transcribe(audios)
        return self.processor([messages], audios=[audios], transcripts=[transcripts] if audios else None,
                              add_generation_prompt=True).to(self.model.device)

    def _kwargs(self, settings: SamplingSettings) -> dict[str, Any]:
        pad_id = self.processor.tokenizer.pad_token_id
        return {**generate_kwargs(settings, pad_id), "eos_token_id": sorted(self.eos_ids)}

    def generate(self, messages: list[dict], audios: list[np.ndarray],
                 settings: SamplingSettings) -> tuple[Generation, int]:
        """The answer and the prompt's length in tokens (audio positions and transcript included)."""
        torch.manual_seed(settings.seed)
        inputs = self._inputs(messages, audios)
        out = self.model.generate(**inputs, **self._kwargs(settings))[0].tolist()
        generation = finish_generation(out, self.eos_ids, settings.max_new_tokens, self.processor.tokenizer)
        return generation, int(inputs["attention_mask"].sum())

    def stream(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
               transcripts: list[str] | None = None) -> Iterator[str]:
        """Yield text pieces of the answer as they are generated."""
        from transformers import TextIteratorStreamer

        torch.manual_seed(settings.seed)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        inputs = self._inputs(messages, audios, transcripts)
        worker = threading.Thread(target=self.model.generate,
                                  kwargs={**inputs, **self._kwargs(settings), "streamer": streamer})
        worker.start()
        yield from streamer
        worker.join()


def load_engine(checkpoint: str | None = None, llm: str | None = None,
                model_id: str | None = None) -> DestaEngine | TextEngine:
    """A DestaEngine for a DeSTA checkpoint folder, or a TextEngine for a chat LLM."""
    if (checkpoint is None) == (llm is None):
        raise ValueError("give a DeSTA checkpoint or --llm for a text-only model, not both")
    if llm is not None:
        return TextEngine(TransformersBackend(llm), model_id or llm)
    from desta.loading import load

    model, processor = load(checkpoint)
    return DestaEngine(model, processor, model_id or checkpoint)
