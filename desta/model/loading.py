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
from transformers import AutoTokenizer, PreTrainedTokenizerBase, WhisperFeatureExtractor

from desta.model.bases import locate_base
from desta.model.modeling import DestaConfig, DestaModel, resolve_checkpoint
from desta.model.processing import DestaProcessor
from desta.prompts import DEFAULT_SYSTEM_PROMPT


def build(encoder: str, llm: str, dtype: torch.dtype = torch.float32, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
          **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """A new model (fresh connector) from a Whisper checkpoint and a chat LLM checkpoint, and its processor,
    which asks with `system_prompt` (None: no system turn).

    `encoder` and `llm` are Hub ids or folders, e.g. "openai/whisper-small" and
    "meta-llama/Meta-Llama-3-8B-Instruct"; config_kwargs go to DestaConfig (num_queries, lora, ...).
    """
    encoder, llm = locate_base(encoder, "the Whisper base"), locate_base(llm, "the LLM base")
    config = DestaConfig.from_components(encoder, llm, **config_kwargs)
    processor = build_processor(config, encoder, llm, system_prompt)
    return DestaModel.from_base(config, dtype=dtype), processor


def processor_for(config: DestaConfig, tokenizer: PreTrainedTokenizerBase,
                  feature_extractor: WhisperFeatureExtractor | None = None,
                  system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> DestaProcessor:
    """The processor of a new model, and the audio token's id recorded in its config (the model finds the audio
    placeholders by it): the one place a config learns the id."""
    processor = DestaProcessor.from_config(config, tokenizer, feature_extractor, system_prompt)
    config.audio_token_id = processor.audio_token_id
    return processor


def build_processor(config: DestaConfig, encoder: str, llm: str,
                    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> DestaProcessor:
    """`processor_for` with the LLM checkpoint's tokenizer and the Whisper checkpoint's feature extractor."""
    return processor_for(config, AutoTokenizer.from_pretrained(llm), _feature_extractor(encoder, config),
                         system_prompt)


def load(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32,
         system_prompt: str | None = None) -> tuple[DestaModel, DestaProcessor]:
    """A saved model and its processor, from a folder written by `save` or a Hub repository id; the processor
    asks with the system prompt the model was trained with, or `system_prompt` ("" for none)."""
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
