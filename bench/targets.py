"""Targets-stage generation speed: batched vs a baseline batch size (default one at a time) on the same
prompts, in one run.

Prompts are DeSTA descriptions of synthetic clips + "What can you hear from the audio?"; the LLM
is the real SmolLM2-135M-Instruct when --models or DESTA_MODELS gives it, else the tiny random
one. Greedy, fixed max_new_tokens. Prints generated tokens/s for both, their ratio and how many
answers are identical, then one JSON line.

    python bench/targets.py --prompts 32 --batch-size 16 --max-new-tokens 64
    python bench/targets.py --prompts 96 --baseline-batch-size 16 --batch-size 48 --max-new-tokens 48
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
from desta.core.generation import SamplingSettings, TransformersBackend
from desta.demo import SMALL_LLM, small_models_dir
from desta.describe import DescribeConfig, describe
from desta.model.tiny import tiny_llm, tiny_tokenizer
from desta.prompts import DEFAULT_SYSTEM_PROMPT, text_turn
from desta.targets import load_described


def timed(backend: TransformersBackend, conversations, settings: SamplingSettings, batch_size: int):
    backend.batch_size = batch_size
    start = time.perf_counter()
    results = backend.generate(conversations, settings)
    seconds = time.perf_counter() - start
    return seconds, sum(r.completion_tokens for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline-batch-size", type=int, default=1, help="the batch size to compare against")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--models", default=None, help="folder with SmolLM2-135M-Instruct")
    args = parser.parse_args()
    if min(args.prompts, args.batch_size, args.baseline_batch_size, args.max_new_tokens) < 1:
        parser.error("--prompts, --batch-size, --baseline-batch-size and --max-new-tokens must each be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = synth_corpus(Path(tmp) / "c", num_clips=args.prompts, seed=0, progress=False)
        describe(DescribeConfig(source=str(manifest), out=str(Path(tmp) / "d"), mapping="synthetic",
                                progress=False))
        descriptions = load_described(Path(tmp) / "d" / "dataset")["description"]
    conversations = [text_turn(d, "What can you hear from the audio?", DEFAULT_SYSTEM_PROMPT)
                     for d in descriptions]
    folder = small_models_dir(args.models)
    if folder:
        backend, weights = TransformersBackend(str(folder / SMALL_LLM)), SMALL_LLM
    else:
        backend, weights = TransformersBackend(llm=tiny_llm(), tokenizer=tiny_tokenizer()), "tiny random"
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)
    timed(backend, conversations[:2], settings, 2)  # warm-up
    base = args.baseline_batch_size
    base_s, base_tokens, base_answers = timed(backend, conversations, settings, base)
    batch_s, batch_tokens, batched = timed(backend, conversations, settings, args.batch_size)
    same = sum(a.text == b.text for a, b in zip(base_answers, batched, strict=True))
    base_rate, batch_rate = base_tokens / base_s, batch_tokens / batch_s
    baseline = "one at a time" if base == 1 else f"batch of {base}"
    print(f"{weights}, {args.prompts} prompts, greedy, max_new_tokens {args.max_new_tokens}, CPU "
          f"{torch.get_num_threads()} threads")
    print(f"{baseline}: {base_tokens} tokens in {base_s:.1f} s = {base_rate:.1f} tokens/s")
    print(f"batch of {args.batch_size}: {batch_tokens} tokens in {batch_s:.1f} s = {batch_rate:.1f} tokens/s")
    print(f"batch of {args.batch_size} is {batch_rate / base_rate:.2f}x faster than {baseline}; {same}/{args.prompts} "
          "answers identical")
    print(json.dumps({"bench": "targets", "weights": weights, "machine": f"{platform.machine()}, "
                      f"{torch.get_num_threads()} threads", "prompts": args.prompts, "batch_size": args.batch_size,
                      "baseline_batch_size": base,
                      "max_new_tokens": args.max_new_tokens, "baseline_tokens_per_s": round(base_rate, 1),
                      "batched_tokens_per_s": round(batch_rate, 1), "speedup": round(batch_rate / base_rate, 2),
                      "identical_answers": same}))


if __name__ == "__main__":
    main()
