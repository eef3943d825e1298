"""Tiny random models for smoke runs: a Whisper, a Llama-style LLM (or a Qwen2-style one: biased q/k/v
projections, a chat template that adds its own system turn, no BOS token) and in-memory chat tokenizers.

Everything here builds without network in well under a second, with weights fixed by the seed.
`model.encoder=tiny` / `model.llm=tiny` in a training config, `desta demo` and `desta tiny-models`
use them; so do the tests and benchmarks. Their answers are noise; what they exercise is the code.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from desta.core.summary import Summary

if TYPE_CHECKING:
    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor

TINY = "tiny"  # the model name that stands for these models in configs
# ChatML, as SmolLM2 and Qwen use.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML as Qwen2.5 writes it: a default system turn when the messages bring none.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny assistant.<|im_end|>\n{% endif %}"
    + CHAT_TEMPLATE
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "What can you hear from the audio?", "The speaker is a woman with a British accent.",
    "A man speaks slowly in a low voice.", "The quick brown fox jumps over the lazy dog.",
    "Describe the speaker's voice.", "Transcribe the audio.", "Gender: Female, Emotion: Neutral, Accent: American",
    "Pitch: High, Volume: Low, Speaking speed: Slow, Duration: 2s", "system user assistant",
    "You are a helpful assistant.", "0123456789 [00:00-00:02] ( ) , . ? ! : ; ' \"",
]


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


def tiny_qwen_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """The tiny tokenizer set up as Qwen2.5's is: no BOS token is ever added, <|im_end|> ends a turn,
    <|endoftext|> pads, and the chat template opens with a default system turn when none is given."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe(vocab_size).to_str()),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE,
    )


@functools.lru_cache(maxsize=1)
def _english_whisper_tokenizer():
    """openai-whisper's English-only tokenizer: the special token ids a Whisper .en model uses."""
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(multilingual=False)


def tiny_whisper_config(**overrides: Any) -> WhisperConfig:
    """A 4-layer, 64-wide Whisper with the English-only vocabulary (ids match openai-whisper's)."""
    tokens = _english_whisper_tokenizer()
    settings = dict(
        vocab_size=tokens.encoding.n_vocab, d_model=64, encoder_layers=4, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=tokens.sot,
        bos_token_id=tokens.eot, eos_token_id=tokens.eot, pad_token_id=tokens.eot,
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


def tiny_qwen2_config(vocab_size: int, **overrides: Any) -> Qwen2Config:
    """A 2-layer, 64-wide Qwen2-style causal LM: biases on the q/k/v projections, no BOS token."""
    tokenizer = tiny_qwen_tokenizer()
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return Qwen2Config(**{**settings, **overrides})


def _english_whisper_generation_config() -> GenerationConfig:
    tokens = _english_whisper_tokenizer()
    space = tokens.encoding.encode(" ")[0]
    return GenerationConfig(
        decoder_start_token_id=tokens.sot, bos_token_id=tokens.eot, eos_token_id=tokens.eot, pad_token_id=tokens.eot,
        no_timestamps_token_id=tokens.no_timestamps, is_multilingual=False, max_length=448,
        begin_suppress_tokens=[space, tokens.eot], return_timestamps=False,
    )


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """A random tiny Whisper (tiny_whisper_config) in eval mode, with English-only generation settings;
    the same weights for a seed."""
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_whisper_config())
    model.generation_config = _english_whisper_generation_config()
    return model.eval()


def tiny_llm(seed: int = 0) -> LlamaForCausalLM:
    """A random tiny Llama-style LM (tiny_llm_config) sized to tiny_tokenizer, in eval mode; the same weights
    for a seed."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llm_config(len(tiny_tokenizer()))).eval()


def tiny_model(seed: int = 0, **config_kwargs: Any) -> tuple[DestaModel, DestaProcessor]:
    """An in-memory tiny DestaModel and its processor (random weights, same for a seed)."""
    # imported here: the tiny bases alone load under an older transformers
    from desta.model.modeling import DestaConfig, DestaModel
    from desta.model.processing import SLOTS, DestaProcessor, add_audio_token

    whisper, llm, tokenizer = tiny_whisper(seed), tiny_llm(seed + 1), tiny_tokenizer()
    audio_token_id = add_audio_token(tokenizer, config_kwargs.get("audio_token", SLOTS.audio_token))
    config = DestaConfig(encoder_config=whisper.config.to_dict(), text_config=llm.config.to_dict(),
                         audio_token_id=audio_token_id, **config_kwargs)
    processor = DestaProcessor.from_config(config, tokenizer)
    torch.manual_seed(seed + 2)
    return DestaModel(config, whisper=whisper, llm=llm).eval(), processor


def save_tiny_bases(folder: str | os.PathLike, seed: int = 0,
                    llm: Literal["llama", "qwen2"] = "llama") -> tuple[Path, Path]:
    """Write the tiny Whisper and a tiny LLM (with its tokenizer) as ordinary transformers folders: the
    Llama-style one (tiny-llm), or the Qwen2-style one (tiny-qwen2)."""
    folder = Path(folder)
    whisper_dir, llm_dir = folder / "tiny-whisper", folder / ("tiny-llm" if llm == "llama" else "tiny-qwen2")
    tiny_whisper(seed).save_pretrained(whisper_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper_dir)
    if llm == "llama":
        tiny_llm(seed + 1).save_pretrained(llm_dir)
        tiny_tokenizer().save_pretrained(llm_dir)
    else:
        torch.manual_seed(seed + 1)
        tokenizer = tiny_qwen_tokenizer()
        Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer))).save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
    return whisper_dir, llm_dir


@dataclass
class TinyModelsConfig:
    """Write the tiny random Whisper and chat LLM (with tokenizer) as model folders, for smoke runs."""

    POSITIONAL = ("out",)
    out: str
    """folder for tiny-whisper/ and tiny-llm/"""
    seed: int = 0
    """the weights depend only on it"""


def write_tiny_models(config: TinyModelsConfig) -> Summary:
    """`desta tiny-models`: write both tiny models into config.out; returns the Whisper and LLM folders."""
    whisper, llm = save_tiny_bases(config.out, seed=config.seed)
    return Summary({"whisper": str(whisper), "llm": str(llm)}, f"wrote {whisper} and {llm}")
