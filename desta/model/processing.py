"""DestaProcessor: chat messages + audio -> model inputs (ids, masks, labels, mel features).

Renders the tokenizer's chat template with an audio placeholder, expands each placeholder to
`windows x num_queries` audio positions followed by the clip's transcript tokens, extracts
variable-length Whisper features per 30 s window, and sets labels to -100 everywhere except the
assistant responses and the token that ends each of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, BatchFeature, PreTrainedConfig, PreTrainedTokenizerBase, WhisperFeatureExtractor

from desta.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE, num_windows, split_windows, time_span, validate_audio
from desta.core.artifacts import CONFIG, PROCESSOR_CONFIG
from desta.core.sequences import IGNORE_INDEX, Conversation, chat_tokens, pad_batch, render_chat, strip_answers
from desta.prompts import DEFAULT_SYSTEM_PROMPT, TRAINED, Trained, speech_turn

# What the transcript slot after the audio vectors reads: the bare transcript (the papers), or the
# clip's time span before it, as the text LLM's description line has it.
TranscriptFormat = Literal["bare", "timestamped"]


@dataclass(frozen=True)
class AudioSlots:
    """How a clip's positions are laid out: the settings a processor shares with its model. A checkpoint's
    config.json holds them (DestaConfig's fields, whose defaults are these) and the processor reads them there."""

    audio_token: str = "<|AUDIO|>"
    num_queries: int = 64
    transcript_max_tokens: int = 100
    pad_to_30s: bool = False
    transcript_format: TranscriptFormat = "bare"


SLOTS = AudioSlots()  # the defaults, set once
MODEL_SETTINGS = tuple(f.name for f in fields(AudioSlots))  # what the processor takes from the model's config
# Pad variable-length windows to a whole number of encoder steps (2 mel frames of 160 samples).
PAD_MULTIPLE = 2 * HOP_LENGTH


def add_audio_token(tokenizer: PreTrainedTokenizerBase, audio_token: str = SLOTS.audio_token) -> int:
    """The id of the audio placeholder in `tokenizer`, added to it first as a special token when it lacks it: its
    positions are overwritten by audio vectors before the LLM sees them, so the LLM's embeddings are never resized.
    A new model's config records this id (`audio_token_id`).

    >>> from desta.model.tiny import tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> add_audio_token(tokenizer) == add_audio_token(tokenizer) == tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    True
    """
    if audio_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(audio_token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(audio_token)


class DestaProcessor:
    """Turns conversations with audio into DestaModel inputs.

    >>> from desta.model.tiny import tiny_tokenizer
    >>> proc = DestaProcessor(WhisperFeatureExtractor(), tiny_tokenizer(), num_queries=2)
    >>> conv = [{"role": "user", "content": "<|AUDIO|>Who?"}, {"role": "assistant", "content": "A man."}]
    >>> batch = proc([conv], audios=[[np.full(16000, 0.1)]], transcripts=[["hi"]])
    >>> tokens = proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    >>> list(zip(tokens, batch["labels"][0].tolist()))  # doctest: +NORMALIZE_WHITESPACE
    [('<|im_start|>', -100), ('user', -100), ('Ċ', -100), ('<|AUDIO|>', -100), ('<|AUDIO|>', -100),
     ('Ġ', -100), ('h', -100), ('i', -100), ('Wh', -100), ('o', -100), ('?', -100), ('<|im_end|>', -100),
     ('Ċ', -100), ('<|im_start|>', -100), ('a', -100), ('ss', -100), ('istan', -100), ('t', -100),
     ('Ċ', -100), ('A', 35), ('Ġman', 388), ('.', 16), ('<|im_end|>', 2), ('Ċ', -100)]
    >>> batch["input_features"].shape  # (windows, mel_bins, frames): 1 s -> 100 frames, not 3000
    torch.Size([1, 80, 100])
    """

    def __init__(self, feature_extractor: WhisperFeatureExtractor, tokenizer: PreTrainedTokenizerBase,
                 audio_token: str = SLOTS.audio_token, num_queries: int = SLOTS.num_queries,
                 transcript_max_tokens: int = SLOTS.transcript_max_tokens, pad_to_30s: bool = SLOTS.pad_to_30s,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 transcript_format: TranscriptFormat = SLOTS.transcript_format):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'in memory'}) has "
                             "no chat template; use a chat (instruct) model's tokenizer or set "
                             "tokenizer.chat_template to a Jinja template")
        if not tokenizer.is_fast:
            raise ValueError("DestaProcessor needs a fast tokenizer (offsets locate the responses); "
                             "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        add_audio_token(tokenizer, audio_token)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.audio_token = audio_token
        self.num_queries = num_queries
        self.transcript_max_tokens = transcript_max_tokens
        self.pad_to_30s = pad_to_30s
        self.system_prompt = system_prompt
        if transcript_format not in get_args(TranscriptFormat):
            raise ValueError(f"transcript_format must be one of {get_args(TranscriptFormat)}, got "
                             f"{transcript_format!r}")
        self.transcript_format = transcript_format

    sampling_rate = SAMPLE_RATE

    @property
    def audio_token_id(self) -> int:
        """The tokenizer's id of the audio placeholder token."""
        return self.tokenizer.convert_tokens_to_ids(self.audio_token)

    @classmethod
    def from_config(cls, config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase,
                    feature_extractor: WhisperFeatureExtractor | None = None,
                    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> DestaProcessor:
        """A processor matching a DestaConfig (its audio token, queries and transcript settings), asking with
        `system_prompt`. It reads the config and never writes it; a config whose audio_token_id is not the
        tokenizer's id of its audio token is refused."""
        feature_extractor = feature_extractor or WhisperFeatureExtractor(
            feature_size=config.encoder_config.num_mel_bins)
        processor = cls(feature_extractor, tokenizer, system_prompt=system_prompt,
                        **{name: getattr(config, name) for name in MODEL_SETTINGS})
        processor.check_audio_token_id(config.audio_token_id)
        return processor

    def check_audio_token_id(self, recorded: int | None) -> None:
        """Refuse a model config whose audio_token_id (`recorded`; None: not recorded) differs from this tokenizer's
        id of the audio token: the model would look for the placeholders under another id."""
        if recorded is not None and recorded != self.audio_token_id:
            raise ValueError(f"the model's config says the audio token {self.audio_token!r} has id {recorded}, but "
                             f"the tokenizer gives it id {self.audio_token_id}; use the tokenizer the model was "
                             "built with (the checkpoint's own)")

    # ----- save / load -----

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the feature extractor, the tokenizer and PROCESSOR_CONFIG (the system prompt; the model's own
        settings, such as the audio token and the queries, are the model's config.json)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / PROCESSOR_CONFIG).write_text(json.dumps({"system_prompt": self.system_prompt}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, system_prompt: str | None | Trained = TRAINED
                        ) -> DestaProcessor:
        """The processor of a checkpoint folder: the settings its config.json holds, and the system prompt it was
        saved with (TRAINED) or `system_prompt` (None or "": none)."""
        folder = Path(folder)
        for name in (CONFIG, PROCESSOR_CONFIG):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} holds no {name}; save the model and its processor there with "
                                        "desta.save(model, processor, folder)")
        config = json.loads((folder / CONFIG).read_text())
        saved = json.loads((folder / PROCESSOR_CONFIG).read_text())
        trained = saved.get("system_prompt", DEFAULT_SYSTEM_PROMPT)
        prompt = trained if system_prompt is TRAINED else system_prompt or None
        processor = cls(WhisperFeatureExtractor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                        system_prompt=prompt, **{name: config[name] for name in MODEL_SETTINGS if name in config})
        processor.check_audio_token_id(config.get("audio_token_id"))
        return processor

    # ----- text -----

    def render(self, conversation: Conversation, add_generation_prompt: bool = False) -> str:
        """The conversation as chat-template text, answers stripped of surrounding whitespace (not tokenized)."""
        return render_chat(self.tokenizer, strip_answers(conversation), add_generation_prompt)

    def conversation(self, instruction: str, response: str | None = None, clips: int = 1) -> Conversation:
        """The speech chat turn: the system prompt this model was trained with, a user message holding
        one audio placeholder per clip and the instruction, and the answer when given."""
        return speech_turn(self.audio_token, instruction, self.system_prompt, response, clips)

    def transcript_text(self, transcript: str | None, seconds: float | None = None) -> str:
        """What the transcript slot reads: the transcript, or (transcript_format "timestamped") the clip's
        time span and the transcript, as the description's line gives them to the text LLM.

        >>> from desta.model.tiny import tiny_tokenizer
        >>> DestaProcessor(WhisperFeatureExtractor(), tiny_tokenizer(), transcript_format="timestamped"
        ...                ).transcript_text("Excuse me?", 2.4)
        '[00:00-00:02] Excuse me?'
        """
        text = (transcript or "").strip()
        if self.transcript_format == "timestamped" and seconds is not None:
            return f"{time_span(seconds)} {text}".strip()
        return text

    def transcript_ids(self, transcript: str | None, seconds: float | None = None, training: bool = True) -> list[int]:
        """Token ids of the transcript slot after a clip's audio positions; [] when there is no transcript.
        Training inputs cut it at transcript_max_tokens; inference keeps it whole, as the official code does."""
        text = self.transcript_text(transcript, seconds)
        if not text:
            return []
        ids = self.tokenizer(" " + text, add_special_tokens=False).input_ids
        return ids[: self.transcript_max_tokens] if training else ids

    def _encode(self, conversation: Conversation, windows: list[int], transcripts: list[str | None],
                add_generation_prompt: bool, with_labels: bool,
                seconds: list[float | None] | None = None) -> tuple[list[int], list[int]]:
        ids, labels = chat_tokens(self.tokenizer, conversation, add_generation_prompt, with_labels)
        audio_id = self.audio_token_id
        placeholders = sum(1 for t in ids if t == audio_id)
        if placeholders != len(windows):
            raise ValueError(f"the conversation holds {placeholders} audio placeholders ({self.audio_token}) but "
                             f"{len(windows)} audio clips were given; put one {self.audio_token} in the user message "
                             "per clip")
        ids_out: list[int] = []
        labels_out: list[int] = []
        clip_index = 0
        for token, label in zip(ids, labels, strict=True):
            if token != audio_id:
                ids_out.append(token)
                labels_out.append(label)
                continue
            expanded = [audio_id] * (windows[clip_index] * self.num_queries)
            expanded += self.transcript_ids(transcripts[clip_index], (seconds or [None] * len(windows))[clip_index],
                                            training=with_labels)
            ids_out += expanded
            labels_out += [IGNORE_INDEX] * len(expanded)
            clip_index += 1
        return ids_out, labels_out

    # ----- batch -----

    def __call__(self, conversations: list[Conversation], audios: list[list[np.ndarray]] | None = None,
                 transcripts: list[list[str | None]] | None = None, sampling_rate: int = SAMPLE_RATE,
                 add_generation_prompt: bool = False, padding_side: str | None = None,
                 window_counts: list[list[int]] | None = None,
                 durations: list[list[float]] | None = None) -> BatchFeature:
        """Batch of conversations (each with its own list of clips and transcripts) -> model inputs.

        Returns input_ids, attention_mask (batch, seq); labels (batch, seq) unless
        add_generation_prompt; input_features (windows, mel_bins, frames) and
        feature_attention_mask (windows, frames) when any audio is given.
        Padding is on the left for generation and on the right for training, unless set.
        With cached encoder features, give `window_counts` (windows per clip) instead of audio:
        the placeholders are expanded and no features are extracted; `durations` (seconds per clip)
        then give the timestamped transcript format its time spans.
        """
        if window_counts is not None:
            if audios is not None:
                raise ValueError("give audios or window_counts, not both")
            audios = [[None] * len(counts) for counts in window_counts]
        audios = audios if audios is not None else [[] for _ in conversations]
        transcripts = transcripts if transcripts is not None else [[None] * len(c) for c in audios]
        if not len(conversations) == len(audios) == len(transcripts):
            raise ValueError(f"got {len(conversations)} conversations, {len(audios)} audio lists and "
                             f"{len(transcripts)} transcript lists; give one of each per conversation")
        with_labels = not add_generation_prompt
        side = padding_side or ("left" if add_generation_prompt else "right")
        rows, windows = [], []
        for row, (conversation, clips, texts) in enumerate(zip(conversations, audios, transcripts, strict=True)):
            if len(texts) != len(clips):
                raise ValueError(f"conversation {row}: {len(clips)} clips but {len(texts)} transcripts")
            if window_counts is not None:
                counts = list(window_counts[row])
                seconds = list(durations[row]) if durations is not None else [None] * len(counts)
            else:
                clips = [validate_audio(np.asarray(c), sampling_rate, f"conversation {row}, clip {i}")
                         for i, c in enumerate(clips)]
                counts = [num_windows(len(c)) for c in clips]
                seconds = [len(c) / SAMPLE_RATE for c in clips]
                windows += [w for clip in clips for w in split_windows(clip)]
            rows.append(self._encode(conversation, counts, texts, add_generation_prompt, with_labels, seconds))

        data = pad_batch([ids for ids, _ in rows], self.tokenizer.pad_token_id, side,
                         labels=[labels for _, labels in rows] if with_labels else None)
        if windows:
            data.update(self.extract_features(windows))
        return BatchFeature(data)

    def extract_features(self, windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Log-mel features of 30 s windows at their real length (or padded to 30 s).

        Returns input_features (windows, mel_bins, frames) and feature_attention_mask (windows, frames).
        """
        if self.pad_to_30s:
            kwargs: dict[str, Any] = {"padding": "max_length", "max_length": N_SAMPLES}
        else:
            kwargs = {"padding": "longest", "pad_to_multiple_of": PAD_MULTIPLE}
        features = self.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                                          return_tensors="pt", **kwargs)
        mask = features.attention_mask
        if self.pad_to_30s:  # the papers' behaviour: the encoder and connector see the padding too
            mask = torch.ones_like(mask)
        return {"input_features": features.input_features, "feature_attention_mask": mask}

    def batch_decode(self, ids: torch.Tensor, **kwargs: Any) -> list[str]:
        """Token ids (batch, seq) -> one string per row, through the tokenizer's batch_decode."""
        return self.tokenizer.batch_decode(ids, **kwargs)
