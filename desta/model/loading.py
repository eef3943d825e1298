"""Build a new DeSTA model from two base checkpoints, or load a saved one, with its processor.

A config records a local base by its absolute path, so a checkpoint loads from any working folder. A base
that is not where the config says (a moved checkpoint, an export naming a base by its folder name) is looked
for beside the checkpoint; a Hub id loads from the Hub, or from the local Hub cache when the Hub cannot be
reached. When none of these has it, loading fails at once, naming the base, where it looked and the fix,
instead of retrying the network for half a minute.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from desta.model.bases import locate_base
from desta.model.modeling import DestaConfig, DestaModel, resolve_checkpoint
from desta.model.processing import SLOTS, DestaProcessor, add_audio_token
from desta.prompts import DEFAULT_SYSTEM_PROMPT, TRAINED, Trained


def build(encoder: str, llm: str, dtype: torch.dtype = torch.float32, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
          **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """A new model (fresh connector) from a Whisper checkpoint and a chat LLM checkpoint, and its processor,
    which asks with `system_prompt` (None: no system turn).

    `encoder` and `llm` are Hub ids or folders, e.g. "openai/whisper-small" and
    "meta-llama/Meta-Llama-3-8B-Instruct"; config_kwargs go to DestaConfig (num_queries, lora, ...).
    """
    encoder, llm = locate_base(encoder, "the Whisper base"), locate_base(llm, "the LLM base")
    config, processor = config_and_processor(encoder, llm, system_prompt, **config_kwargs)
    return DestaModel.from_base(config, dtype=dtype), processor


def config_and_processor(encoder: str, llm: str, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                         **config_kwargs: Any) -> tuple[DestaConfig, DestaProcessor]:
    """The config of a new model on two base checkpoints, recording the audio token's id in the LLM's tokenizer,
    and the processor that reads it (the LLM's tokenizer, the Whisper checkpoint's feature extractor)."""
    tokenizer = AutoTokenizer.from_pretrained(llm)
    audio_token_id = add_audio_token(tokenizer, config_kwargs.get("audio_token", SLOTS.audio_token))
    config = DestaConfig.from_components(encoder, llm, audio_token_id=audio_token_id, **config_kwargs)
    return config, DestaProcessor.from_config(config, tokenizer, _feature_extractor(encoder, config), system_prompt)


def load(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32,
         system_prompt: str | None | Trained = TRAINED) -> tuple[DestaModel, DestaProcessor]:
    """A saved model and its processor, from a folder written by `save` or a Hub repository id; the processor
    asks with the system prompt the model was trained with (TRAINED), or `system_prompt` (None: no system turn,
    as in `build`)."""
    folder = resolve_checkpoint(checkpoint)
    return DestaModel.from_pretrained(folder, dtype=dtype), DestaProcessor.from_pretrained(folder, system_prompt)


def save(model: DestaModel, processor: DestaProcessor, folder: str | os.PathLike) -> None:
    """Trainable weights, config and processor files in one folder that `load` reads back."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _feature_extractor(encoder: str, config: DestaConfig) -> WhisperFeatureExtractor:
    try:
        return WhisperFeatureExtractor.from_pretrained(encoder)
    except OSError:  # a Whisper folder without preprocessor_config.json: the standard extractor
        return WhisperFeatureExtractor(feature_size=config.encoder_config.num_mel_bins)
