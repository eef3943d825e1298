"""Tiny offline fixtures: random Whisper and Llama-style models and an in-memory chat tokenizer.

Everything here builds without network in well under a second. Tests, benchmarks and the tiny
default use it; `load_real_models` reads the small real checkpoints that
shared/tools/fetch_offline_models.sh builds (Whisper tiny.en + SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from desta.modeling import DestaConfig, DestaModel
from desta.processing import DestaProcessor

# ChatML, as SmolLM2 and Qwen use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What can you hear from the audio?", "The speaker is a woman with a British accent.",
    "A man speaks slowly in a low voice.", "The quick brown fox jumps over the lazy dog.",
    "Describe the speaker's voice.", "Transcribe the audio.", "Gender: Female, Emotion: Neutral, Accent: American",
    "Pitch: High, Volume: Low, Speaking speed: Slow, Duration: 2s", "system user assistant",
    "You are a helpful assistant.", "0123456789 [00:00-00:02] ( ) , . ? ! : ; ' \"",
]
REAL_WHISPER = "whisper-tiny.en"
REAL_LLM = "SmolLM2-135M-Instruct"
# Hub ids of the same checkpoints, for machines that reach the Hub.
REAL_HUB_IDS = {REAL_WHISPER: "openai/whisper-tiny.en", REAL_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct"}


@functools.lru_cache(maxsize=1)
def _bpe(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tokenizer


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE chat tokenizer trained in memory (deterministic), ChatML template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe(vocab_size).to_str()),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_whisper_config(**overrides: Any) -> WhisperConfig:
    """A 4-layer, 64-wide Whisper with the English-only vocabulary (ids match openai-whisper's)."""
    settings = dict(
        vocab_size=51864, d_model=64, encoder_layers=4, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    return WhisperConfig(**{**settings, **overrides})


def tiny_llm_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A 2-layer, 64-wide Llama-style causal LM."""
    tokenizer = tiny_tokenizer()
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


def _english_whisper_generation_config() -> GenerationConfig:
    return GenerationConfig(
        decoder_start_token_id=50257, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
        no_timestamps_token_id=50362, is_multilingual=False, max_length=448, begin_suppress_tokens=[220, 50256],
        return_timestamps=False,
    )


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_whisper_config())
    model.generation_config = _english_whisper_generation_config()
    return model.eval()


def tiny_llm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llm_config(len(tiny_tokenizer()))).eval()


def tiny_model(seed: int = 0, **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """An in-memory tiny DestaModel and its processor (random weights, same for a seed)."""
    whisper, llm, tokenizer = tiny_whisper(seed), tiny_llm(seed + 1), tiny_tokenizer()
    config = DestaConfig(encoder_config=whisper.config.to_dict(), text_config=llm.config.to_dict(), **config_kwargs)
    processor = DestaProcessor.from_config(config, tokenizer)
    torch.manual_seed(seed + 2)
    return DestaModel(config, whisper=whisper, llm=llm).eval(), processor


def save_tiny_bases(folder: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny Whisper and tiny LLM (with tokenizer) as ordinary transformers folders."""
    folder = Path(folder)
    whisper_dir, llm_dir = folder / "tiny-whisper", folder / "tiny-llm"
    tiny_whisper(seed).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper_dir)
    tiny_llm(seed + 1).save_pretrained(llm_dir)
    tiny_tokenizer().save_pretrained(llm_dir)
    return whisper_dir, llm_dir


def real_models_dir(models_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of fetch_offline_models.sh (argument, $DESTA_MODELS, or its default), if it holds both."""
    candidates = [models_dir, os.environ.get("DESTA_MODELS"), Path.home() / ".cache" / "desta-offline-models"]
    for candidate in candidates:
        if candidate and (Path(candidate) / REAL_WHISPER / "model.safetensors").is_file() and (
                Path(candidate) / REAL_LLM / "model.safetensors").is_file():
            return Path(candidate)
    return None


def load_real_models(models_dir: str | os.PathLike | None = None,
                     **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """A DestaModel on real Whisper tiny.en + SmolLM2-135M-Instruct (fresh connector)."""
    from desta.loading import build

    folder = real_models_dir(models_dir)
    if folder is None:
        raise FileNotFoundError("no real checkpoints found; build them with "
                                "shared/tools/fetch_offline_models.sh DEST and pass DEST (or set DESTA_MODELS)")
    return build(str(folder / REAL_WHISPER), str(folder / REAL_LLM), **config_kwargs)


def toy_targets(described: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A targets dataset whose responses come from a template over the gold attributes (no LLM):
    a learnable stand-in for self-output targets in tests and benchmarks. Returns the dataset folder."""
    from datasets import load_from_disk

    from desta.prompts import TRAINING_POOLS

    dataset = load_from_disk(str(described))
    responses = [f"A {g.lower() if g else 'person'} with a {a or 'neutral'} accent says: {t}"
                 for g, a, t in zip(dataset["gender"], dataset["accent"], dataset["transcript"], strict=True)]
    dataset = dataset.add_column("prompt", [TRAINING_POOLS["desta2"][0]] * len(dataset))
    dataset = dataset.add_column("prompt_pool", ["desta2"] * len(dataset))
    dataset = dataset.add_column("response", responses)
    dataset = dataset.add_column("generator", ['{"backend": "template"}'] * len(dataset))
    dataset.save_to_disk(str(out))
    return Path(out)
