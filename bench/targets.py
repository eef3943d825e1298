"""Targets-stage generation speed: batching settings (and backends) side by side on the same prompts, in one run.

Prompts are DeSTA descriptions of synthetic clips + "What can you hear from the audio?"; the LLM is the real
SmolLM2-135M-Instruct when --models or DESTA_MODELS gives it, else the tiny random one. Greedy, fixed
max_new_tokens. For each setting: generated tokens/s, the ratio to the first setting's and how many answers are
identical to the first's; then one JSON line.

Settings (--settings, comma-separated; the first is the baseline):
  batch:N        padded batches of N prompts
  tokens:N       padded batches holding N tokens (tokens:memory: sized from the GPU's free memory)
  continuous     transformers' continuous batching (continuous:N: its cache holds N tokens; default on a GPU)
  vllm           vLLM's offline engine (a CUDA machine with vLLM installed; the folder of --models)

    python bench/targets.py --prompts 32 --batch-size 16 --max-new-tokens 64      # batch:1 against batch:16
    python bench/targets.py --prompts 96 --baseline-batch-size 16 --batch-size 48 --max-new-tokens 48
    python bench/targets.py --prompts 1024 --max-new-tokens 256 --settings tokens:memory,continuous,vllm  # a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from desta.audio.synth import synth_corpus
from desta.core.generation import SamplingSettings, TransformersBackend, VLLMBackend
from desta.demo import SMALL_LLM, small_models_dir
from desta.describe import DescribeConfig, describe
from desta.model.tiny import tiny_llm, tiny_tokenizer
from desta.prompts import DEFAULT_SYSTEM_PROMPT, text_turn
from desta.targets import load_described


def backend_for(setting: str, llm, tokenizer, folder: Path | None):
    """The backend a setting names, on the already loaded LLM (vLLM loads the folder itself)."""
    kind, _, size = setting.partition(":")
    if kind == "vllm":
        if folder is None:
            raise SystemExit("the vllm setting needs --models (a folder holding SmolLM2-135M-Instruct)")
        return VLLMBackend(str(folder / SMALL_LLM))
    if kind == "batch":
        return TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=int(size))
    if kind == "tokens":
        return TransformersBackend(llm=llm, tokenizer=tokenizer, token_budget=size if size == "memory" else int(size))
    if kind == "continuous":
        return TransformersBackend(llm=llm, tokenizer=tokenizer, continuous=True, token_budget=int(size) if size
                                   else None)
    raise SystemExit(f"unknown setting {setting!r}: use batch:N, tokens:N, tokens:memory, continuous[:N] or vllm")


def timed(backend, conversations, settings: SamplingSettings):
    start = time.perf_counter()
    results = backend.generate(conversations, settings)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, sum(r.completion_tokens for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-batch-size", type=int, default=1, help="the batch size to compare against")
    parser.add_argument("--settings", default=None, help="comma-separated settings, the baseline first (default: "
                                                         "batch:BASELINE-BATCH-SIZE,batch:BATCH-SIZE)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--models", default=None, help="folder with SmolLM2-135M-Instruct")
    args = parser.parse_args()
    if min(args.prompts, args.batch_size, args.baseline_batch_size, args.max_new_tokens) < 1:
        parser.error("--prompts, --batch-size, --baseline-batch-size and --max-new-tokens must each be at least 1")
    names = (args.settings or f"batch:{args.baseline_batch_size},batch:{args.batch_size}").split(",")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = synth_corpus(Path(tmp) / "c", num_clips=args.prompts, seed=0, progress=False)
        describe(DescribeConfig(source=str(manifest), out=str(Path(tmp) / "d"), mapping="synthetic",
                                progress=False))
        descriptions = load_described(Path(tmp) / "d" / "dataset")["description"]
    conversations = [text_turn(d, "What can you hear from the audio?", DEFAULT_SYSTEM_PROMPT)
                     for d in descriptions]
    folder = small_models_dir(args.models)
    if folder:
        from desta.core.llm import load_chat_llm

        (llm, tokenizer), weights = load_chat_llm(str(folder / SMALL_LLM)), SMALL_LLM
    else:
        llm, tokenizer, weights = tiny_llm(), tiny_tokenizer(), "tiny random"
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    device = str(next(llm.parameters()).device)
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else (
        f"CPU, {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{weights}, {args.prompts} prompts, greedy, max_new_tokens {args.max_new_tokens}, {machine}")
    results, first = {}, None
    for name in names:
        try:
            backend = backend_for(name, llm, tokenizer, folder)
        except ImportError as error:  # vLLM on a machine without it: said, and the others still run
            print(f"{name:>16}: not run ({error})")
            continue
        timed(backend, conversations[:2], SamplingSettings(max_new_tokens=2))  # warm-up
        seconds, tokens, answers = timed(backend, conversations, settings)
        first = first or answers
        same = sum(a.text == b.text for a, b in zip(first, answers, strict=True))
        results[name] = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                         "identical_answers": same}
        print(f"{name:>16}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s; {same}/{args.prompts}"
              f" answers identical to {names[0]}'s", flush=True)
    names = [name for name in names if name in results]
    base = results[names[0]]["tokens_per_s"]
    for name in names[1:]:
        print(f"{name} is {results[name]['tokens_per_s'] / base:.2f}x {names[0]}")
    line = {"bench": "targets", "weights": weights, "machine": machine, "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens, "settings": results}
    if args.settings is None:  # the batch:N comparison's keys, as before
        last = results[names[-1]]["tokens_per_s"]
        line.update(batch_size=args.batch_size, baseline_batch_size=args.baseline_batch_size,
                    baseline_tokens_per_s=base, batched_tokens_per_s=last, speedup=round(last / base, 2),
                    identical_answers=results[names[-1]]["identical_answers"])
    print(json.dumps(line))


if __name__ == "__main__":
    main()
