"""Answering one conversation at a time, streamed or not: the engines behind `desta chat`, `desta serve`
and the web app. A DestaEngine hears audio parts (Whisper transcribes them first); a TextEngine is
a plain chat LLM. Both stop at the same end-of-turn tokens the rest of desta uses, refuse a prompt
the model's context cannot hold before generating, and a stream can be stopped at the next token
(`Stream.stop`), which the server does when its client goes away. A finished stream says why it ended
("stop" or "length") and how many tokens it took, as a non-streamed answer does.

One engine answers several request threads at once (`desta serve --max-concurrent N`, the web app): the
tokenizer is used by one thread at a time (a fast tokenizer's padding settings are shared state), and
Whisper's voice activity detection is serialized in desta.audio.asr. The weights are only read.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from desta.core.generation import Generation, SamplingSettings, TransformersBackend, finish_generation, generate_kwargs
from desta.core.sequences import end_of_turn_ids
from desta.prompts import system_prompt_setting, with_system

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor


MAX_AUDIO_SECONDS = 120.0  # the longest clip chat, serve and the app take by default (each has a setting)


class PromptTooLong(ValueError):
    """A prompt longer than the model's context (with the answer) or the server's prompt limit."""


def check_prompt(prompt_tokens: int, max_new_tokens: int, context: int, limit: int | None = None) -> None:
    """Raise PromptTooLong when the prompt and the answer do not fit the context, or the prompt passes `limit`.

    >>> check_prompt(4000, 200, 4096)
    Traceback (most recent call last):
    ...
    desta.serving.engine.PromptTooLong: the model's context holds 4096 tokens, but the prompt takes 4000 and \
max_tokens asks for 200 more; shorten the messages or lower max_tokens
    """
    if limit is not None and prompt_tokens > limit:
        raise PromptTooLong(f"the prompt takes {prompt_tokens} tokens; this server accepts at most {limit}; shorten "
                            "the messages")
    if prompt_tokens + max_new_tokens > context:
        raise PromptTooLong(f"the model's context holds {context} tokens, but the prompt takes {prompt_tokens} and "
                            f"max_tokens asks for {max_new_tokens} more; shorten the messages or lower max_tokens")


class _StopWhenSet(StoppingCriteria):
    """Ends generation at the next token once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """One flag per sequence: all True once the event is set."""
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also keeps the new token ids, to say at the end why the answer stopped, and
    decodes holding the engine's tokenizer lock (a decode while another thread changes the fast tokenizer's
    padding settings fails with "Already borrowed")."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_prompt: bool, lock: threading.Lock):
        super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self.token_ids: list[int] = []
        self.lock = lock

    def put(self, value: torch.Tensor) -> None:
        """Keep the ids of each new token (not the prompt's), then stream their text."""
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.token_ids += value.reshape(-1).tolist()  # (1, tokens) or (tokens,): one answer
        with self.lock:
            super().put(value)

    def end(self) -> None:
        """Stream the text still held back, then signal the end."""
        with self.lock:
            super().end()


class Stream:
    """One answer being generated in a worker thread; iterate for its text pieces as they come.

    `stop()` ends the generation at the next token and waits for the thread. An error in the worker
    ends the iteration and is raised to the reader, so a reader never waits forever. `on_done` runs in
    the worker as soon as generation ends (before the reader sees the last piece): the server frees the
    request's slot there, not when the client has read everything. Once iterated to the end,
    `generation` holds the finish reason and token count, `prompt_tokens` the prompt's length.
    """

    def __init__(self, generate: Callable[..., Any], kwargs: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                 skip_prompt: bool, eos_ids: set[int], prompt_tokens: int, tokenizing: threading.Lock,
                 on_done: Callable[[], None] | None = None):
        self.stopped = threading.Event()
        self.streamer = _TokenStreamer(tokenizer, skip_prompt, tokenizing)
        self.tokenizing = tokenizing
        self.error: BaseException | None = None
        self.tokenizer, self.eos_ids, self.prompt_tokens = tokenizer, eos_ids, prompt_tokens
        self.max_new_tokens = int(kwargs["max_new_tokens"])
        self.generation: Generation | None = None
        self.on_done = on_done
        kwargs = {**kwargs, "streamer": self.streamer,
                  "stopping_criteria": StoppingCriteriaList([_StopWhenSet(self.stopped)])}
        self.thread = threading.Thread(target=self._run, args=(generate, kwargs), daemon=True)
        self.thread.start()

    def _run(self, generate: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        try:
            with torch.no_grad():
                generate(**kwargs)
        except BaseException as err:  # handed to the reader, which would otherwise wait for pieces forever
            self.error = err
            self.streamer.end()
        finally:
            if self.on_done is not None:
                self.on_done()

    def __iter__(self) -> Iterator[str]:
        """The answer's text pieces, in order; raises the worker's error, if it had one, at the end."""
        yield from self.streamer
        self.thread.join()
        if self.error is not None:
            raise self.error
        with self.tokenizing:
            self.generation = finish_generation(self.streamer.token_ids, self.eos_ids, self.max_new_tokens,
                                                self.tokenizer)

    def stop(self) -> None:
        """End the generation at the next token and wait for the worker to finish."""
        self.stopped.set()
        self.thread.join()


class TextEngine:
    """A plain chat LLM; `system_prompt` goes first when the messages hold no system turn."""

    accepts_audio = False

    def __init__(self, backend: TransformersBackend, model_id: str, system_prompt: str | None = None):
        self.backend, self.model_id, self.system_prompt = backend, model_id, system_prompt
        self.audio_token = None
        self.context = int(backend.llm.config.max_position_embeddings)
        self.special_tokens = list(backend.tokenizer.all_special_tokens)
        self.tokenizing = threading.Lock()

    def _prompt(self, messages: list[dict], settings: SamplingSettings, max_prompt_tokens: int | None) -> list[int]:
        with self.tokenizing:
            ids = self.backend.encode(with_system(messages, self.system_prompt))
        check_prompt(len(ids), settings.max_new_tokens, self.context, max_prompt_tokens)
        return ids

    def generate(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
                 max_prompt_tokens: int | None = None) -> tuple[Generation, int]:
        """The answer and the prompt's length in tokens (a text model: `audios` is not used)."""
        ids = self._prompt(messages, settings, max_prompt_tokens)
        new_ids = self.backend.generate_ids([ids], settings)[0]
        with self.tokenizing:
            return finish_generation(new_ids, self.backend.eos_ids, settings.max_new_tokens,
                                     self.backend.tokenizer), len(ids)

    def stream(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
               max_prompt_tokens: int | None = None, on_done: Callable[[], None] | None = None) -> Stream:
        """Start the answer; the returned Stream yields its text pieces (a text model: `audios` is not used).
        `on_done` runs when generation ends."""
        torch.manual_seed(settings.seed)
        ids = torch.tensor([self._prompt(messages, settings, max_prompt_tokens)], device=self.backend.device)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  **generate_kwargs(settings, self.backend.pad_id), "eos_token_id": sorted(self.backend.eos_ids)}
        return Stream(self.backend.llm.generate, kwargs, self.backend.tokenizer, skip_prompt=True,
                      eos_ids=self.backend.eos_ids, prompt_tokens=ids.shape[1], tokenizing=self.tokenizing,
                      on_done=on_done)


class DestaEngine:
    """A DeSTA speech LLM: audio parts become placeholders filled by the connector. Messages without a system
    turn get the one the model was trained with (the processor's), as in `desta chat` and `desta eval`."""

    accepts_audio = True

    def __init__(self, model: DestaModel, processor: DestaProcessor, model_id: str):
        self.model, self.processor, self.model_id = model, processor, model_id
        self.system_prompt = processor.system_prompt
        self.audio_token = processor.audio_token
        self.eos_ids = end_of_turn_ids(processor.tokenizer, model.llm.generation_config)
        self.context = int(model.llm.config.max_position_embeddings)
        self.special_tokens = list(processor.tokenizer.all_special_tokens)
        self.tokenizing = threading.Lock()

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Clips, each (samples,) at 16 kHz -> one Whisper transcript per clip ([] for no clips)."""
        return self.model.transcribe(self.processor, audios) if audios else []

    def _inputs(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
                transcripts: list[str] | None = None, max_prompt_tokens: int | None = None) -> Any:
        if audios and transcripts is None:
            transcripts = self.transcribe(audios)
        messages = with_system(messages, self.system_prompt)
        with self.tokenizing:
            inputs = self.processor([messages], audios=[audios], transcripts=[transcripts] if audios else None,
                                    add_generation_prompt=True).to(self.model.device)
        check_prompt(int(inputs["attention_mask"].sum()), settings.max_new_tokens, self.context, max_prompt_tokens)
        return inputs

    def _kwargs(self, settings: SamplingSettings) -> dict[str, Any]:
        pad_id = self.processor.tokenizer.pad_token_id
        return {**generate_kwargs(settings, pad_id), "eos_token_id": sorted(self.eos_ids)}

    @torch.no_grad()
    def generate(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
                 max_prompt_tokens: int | None = None) -> tuple[Generation, int]:
        """The answer and the prompt's length in tokens (audio positions and transcript included)."""
        torch.manual_seed(settings.seed)
        inputs = self._inputs(messages, audios, settings, max_prompt_tokens=max_prompt_tokens)
        out = self.model.generate(**inputs, **self._kwargs(settings))[0].tolist()
        with self.tokenizing:
            generation = finish_generation(out, self.eos_ids, settings.max_new_tokens, self.processor.tokenizer)
        return generation, int(inputs["attention_mask"].sum())

    def stream(self, messages: list[dict], audios: list[np.ndarray], settings: SamplingSettings,
               transcripts: list[str] | None = None, max_prompt_tokens: int | None = None,
               on_done: Callable[[], None] | None = None) -> Stream:
        """Start the answer; the returned Stream yields its text pieces (the model returns new tokens only).
        `on_done` runs when generation ends."""
        torch.manual_seed(settings.seed)
        inputs = self._inputs(messages, audios, settings, transcripts, max_prompt_tokens)
        return Stream(self.model.generate, {**inputs, **self._kwargs(settings)}, self.processor.tokenizer,
                      skip_prompt=False, eos_ids=self.eos_ids, prompt_tokens=int(inputs["attention_mask"].sum()),
                      tokenizing=self.tokenizing, on_done=on_done)


def load_engine(checkpoint: str | None = None, llm: str | None = None, model_id: str | None = None,
                system_prompt: str | None = None) -> DestaEngine | TextEngine:
    """A DestaEngine for a DeSTA checkpoint folder (asking with the system prompt it was trained with, or
    `system_prompt`: "" for none), or a TextEngine for a chat LLM (with `system_prompt`, if given); served as
    `model_id`, by default the folder's name (`served_name`)."""
    if (checkpoint is None) == (llm is None):
        raise ValueError("give a DeSTA checkpoint or --llm for a text-only model, not both")
    if llm is not None:
        return TextEngine(TransformersBackend(llm), model_id or served_name(llm), system_prompt or None)
    from desta.model.loading import load

    model, processor = load(checkpoint, system_prompt=system_prompt_setting(system_prompt))
    return DestaEngine(model, processor, model_id or served_name(checkpoint))


def served_name(model: str) -> str:
    """The model id clients ask for by default: a local folder's name (however the path was typed), a Hub id as
    it is.

    >>> served_name("openai/whisper-small"), served_name(".") == Path.cwd().name
    ('openai/whisper-small', True)
    """
    path = Path(model)
    return path.resolve().name if path.exists() else model
