"""Training throughput: on-the-fly encoder padded to 30 s, on-the-fly at real length, cached features.

Same data (synthetic clips with template targets), same model, same steps; each mode runs in its
own process so its peak memory is its own. Uses the real Whisper tiny.en + SmolLM2-135M-Instruct
when --models or DESTA_MODELS gives them, else the tiny random models. Prints a table and one
JSON line.

    python bench/train.py --steps 6 --batch-size 8 [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch


def run_mode(mode: str, targets: str, models: str | None, steps: int, batch_size: int, cache: str,
             queue) -> None:
    from desta.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.demo import SMALL_LLM, SMALL_WHISPER
    from desta.features import FeatureCache
    from desta.train import ModelSection, build_model

    torch.manual_seed(0)
    section = ModelSection(pad_to_30s=mode == "padded_30s")
    if models:
        section.encoder, section.llm = str(Path(models) / SMALL_WHISPER), str(Path(models) / SMALL_LLM)
    model, processor = build_model(section, Path(cache).parent)
    model.train()
    processor.system_prompt = None
    examples = speech_examples(load_targets(targets, "bench"), processor)
    dataset = DestaDataset(examples, FeatureCache(cache, model) if mode == "cached" else None)
    collate = DestaCollator(processor, 4096)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(index: int) -> None:
        items = [dataset[(index * batch_size + k) % len(dataset)] for k in range(batch_size)]
        batch = {k: v for k, v in collate(items).items() if k != "sample_ids"}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(0)  # warm-up
    start = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux reports KiB)
    queue.put({"mode": mode, "samples_per_s": steps * batch_size / seconds, "peak_rss_gb": peak})


def main() -> None:
    from desta.data import load_targets
    from desta.demo import SMALL_LLM, SMALL_WHISPER, small_models_dir
    from desta.describe import DescribeConfig, describe
    from desta.features import cache_features
    from desta.synth import synth_corpus
    from desta.targets import TargetsConfig
    from desta.targets import targets as write_targets
    from desta.train import ModelSection, build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--models", default=None)
    args = parser.parse_args()
    models = small_models_dir(args.models)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = synth_corpus(tmp / "corpus", num_clips=args.clips, seed=0, progress=False)
        describe(DescribeConfig(source=str(manifest), out=str(tmp / "d"), mapping="synthetic", progress=False))
        write_targets(TargetsConfig(source=str(tmp / "d" / "dataset"), out=str(tmp / "targets"), kind="labels",
                                    progress=False))
        targets = str(tmp / "targets" / "dataset")
        section = ModelSection()
        if models:
            section.encoder, section.llm = str(models / SMALL_WHISPER), str(models / SMALL_LLM)
        model, processor = build_model(section, tmp)
        start = time.perf_counter()
        cache_features(model, processor, load_targets(targets, "bench"), tmp / "cache", dtype="float32",
                       progress=False)
        cache_seconds = time.perf_counter() - start
        del model
        results = {}
        context = mp.get_context("spawn")
        for mode in ("padded_30s", "variable", "cached"):
            queue = context.Queue()
            process = context.Process(target=run_mode, args=(mode, targets, str(models) if models else None,
                                                             args.steps, args.batch_size, str(tmp / "cache"), queue))
            process.start()
            results[mode] = queue.get()
            process.join()
    weights = "whisper-tiny.en + SmolLM2-135M-Instruct" if models else "tiny random"
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"
    print(f"{weights}; batch {args.batch_size}; {args.steps} timed steps; {machine}")
    for mode, r in results.items():
        print(f"{mode:>11}: {r['samples_per_s']:7.2f} samples/s, peak RSS {r['peak_rss_gb']:.2f} GiB")
    base = results["padded_30s"]["samples_per_s"]
    print(f"variable length: {results['variable']['samples_per_s'] / base:.1f}x, cached: "
          f"{results['cached']['samples_per_s'] / base:.1f}x the padded-to-30 s speed; building the cache took "
          f"{cache_seconds:.1f} s for {args.clips} clips")
    print(json.dumps({"bench": "train", "weights": weights, "machine": machine, "batch_size": args.batch_size,
                      "steps": args.steps, **{f"{m}_samples_per_s": round(r["samples_per_s"], 3)
                                              for m, r in results.items()},
                      **{f"{m}_peak_rss_gb": round(r["peak_rss_gb"], 3) for m, r in results.items()},
                      "cache_build_s": round(cache_seconds, 2)}))


if __name__ == "__main__":
    main()
