"""Dequantize a Llama-architecture GGUF checkpoint into an ordinary transformers folder
(config, safetensors in bfloat16, tokenizer with its chat template).

Usage: python tools/gguf_llama_to_hf.py FILE.gguf OUT_FOLDER (fetch_offline_models.sh and
fetch_stronger_models.sh, beside this file, call it)."""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(gguf_path: str, dst: str) -> None:
    """Write dst (bf16 safetensors, tokenizer) from the GGUF file at gguf_path."""
    folder, name = gguf_path.rsplit("/", 1)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(quantized.config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    print("wrote", dst, f"{sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
