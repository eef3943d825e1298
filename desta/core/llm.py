"""Loading a chat LLM the same way everywhere: device, dtype and one fix for converted folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def default_device() -> str:
    """"cuda" when a CUDA GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | None = None) -> torch.dtype:
    """bfloat16 on a GPU, float32 on a CPU."""
    return torch.bfloat16 if (device or default_device()).startswith("cuda") else torch.float32


def llm_config(name: str) -> PreTrainedConfig:
    """AutoConfig.from_pretrained, except that a GGUF quantization entry left in the config of a folder that
    holds plain safetensors weights (what GGUF-to-transformers conversions write) is dropped: the weights are
    ordinary, trainable tensors, not to be re-packed. The one place that fix is made."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    quantization = getattr(config, "quantization_config", None)
    folder = Path(name)
    if isinstance(quantization, dict) and quantization.get("quant_method") == "gguf" and folder.is_dir() \
            and any(folder.glob("*.safetensors")) and not any(folder.glob("*.gguf")):
        del config.quantization_config
    return config


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained with the config `llm_config` reads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, config=llm_config(name), dtype=dtype)


def load_chat_llm(name: str, device: str | None = None,
                  dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A chat LLM on the device in evaluation mode, and its tokenizer (which must have a chat template)."""
    from transformers import AutoTokenizer

    device = device or default_device()
    llm = load_causal_lm(name, dtype=dtype or default_dtype(device)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {name} has no chat template; use a chat (instruct) model")
    return llm, tokenizer
