"""Build a new DeSTA model from two base checkpoints, or load a saved one, with its processor."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoTokenizer, WhisperFeatureExtractor

from desta.modeling import DestaConfig, DestaModel, resolve_checkpoint
from desta.processing import DestaProcessor


def build(encoder: str, llm: str, dtype: torch.dtype = torch.float32,
          **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """A new model (fresh connector) from a Whisper checkpoint and a chat LLM checkpoint.

    `encoder` and `llm` are Hub ids or folders, e.g. "openai/whisper-small" and
    "meta-llama/Meta-Llama-3-8B-Instruct"; config_kwargs go to DestaConfig (num_queries, lora, ...).
    """
    config = DestaConfig.from_components(encoder, llm, **config_kwargs)
    processor = build_processor(config, encoder, llm)
    return DestaModel.from_base(config, dtype=dtype), processor


def build_processor(config: DestaConfig, encoder: str, llm: str) -> DestaProcessor:
    """The processor for a config: the LLM checkpoint's tokenizer, the Whisper checkpoint's feature extractor;
    sets config.audio_token_id."""
    return DestaProcessor.from_config(config, AutoTokenizer.from_pretrained(llm), _feature_extractor(encoder, config))


def load(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[DestaModel, DestaProcessor]:
    """A saved model and its processor, from a folder written by `save` or a Hub repository id."""
    folder = resolve_checkpoint(checkpoint)
    return DestaModel.from_pretrained(folder, dtype=dtype), DestaProcessor.from_pretrained(folder)


def save(model: DestaModel, processor: DestaProcessor, folder: str | os.PathLike) -> None:
    """Trainable weights, config and processor files in one folder that `load` reads back."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _feature_extractor(encoder: str, config: DestaConfig) -> WhisperFeatureExtractor:
    try:
        return WhisperFeatureExtractor.from_pretrained(encoder)
    except OSError:  # a Whisper folder without preprocessor_config.json: the standard extractor
        return WhisperFeatureExtractor(feature_size=config.encoder_config.num_mel_bins)
