"""Training throughput and memory: on-the-fly encoder padded to 30 s, on-the-fly at real length, cached
features, cached features with the LM head on every position (the training forward before #28: the
baseline of the response-only logits every other mode uses), and cached features with gradient
checkpointing of the (frozen) LLM.

Same data (synthetic clips with template targets), same model, same steps; each mode runs in its
own process so its peak memory is its own (VmHWM: the process's peak resident memory). The step
memory (peak minus the resident memory before the first step: activations, gradients, AdamW's
moments) is set beside what `desta plan` predicts for the same shapes. Uses the real Whisper
tiny.en + SmolLM2-135M-Instruct when --models or DESTA_MODELS gives them, else the tiny random
models. Prints a table and one JSON line.

    python bench/train.py --steps 6 --batch-size 8 [--models DIR]

With --startup N it measures instead what `desta train` does before its first step on a targets table of N rows
(synthetic clips' rows repeated under new ids, audio by path; tiny bases): the seconds and the peak resident memory
of `desta.train.run.setup` in a fresh process, twice in the same output folder (a restart, or a second process of
a launch, finds what the first computed).

    python bench/train.py --startup 200000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import tempfile
import time
from pathlib import Path

import torch


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM); ru_maxrss would include the parent's."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024


def run_mode(mode: str, targets: str, models: str | None, steps: int, batch_size: int, cache: str,
             queue) -> None:
    from desta.demo import SMALL_LLM, SMALL_WHISPER
    from desta.train.config import ModelSection
    from desta.train.data import DestaCollator, DestaDataset, load_targets, speech_examples
    from desta.train.features import FeatureCache
    from desta.train.run import build_model

    torch.manual_seed(0)
    section = ModelSection(pad_to_30s=mode == "padded_30s")
    if models:
        section.encoder, section.llm = str(Path(models) / SMALL_WHISPER), str(Path(models) / SMALL_LLM)
    model, processor = build_model(section, Path(cache).parent, system_prompt=None)
    if mode.endswith("checkpointing"):
        model.llm.activation_checkpointing_enable()
    model.train()
    examples = speech_examples(load_targets(targets, "bench"), processor)
    dataset = DestaDataset(examples, FeatureCache(cache, model) if mode.startswith("cached") else None)
    collate = DestaCollator(processor, 4096)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    widths, labelled = [], []
    logits_at = "all" if mode.endswith("all_logits") else "labelled"

    def step(index: int) -> None:
        items = [dataset[(index * batch_size + k) % len(dataset)] for k in range(batch_size)]
        batch = {k: v for k, v in collate(items).items() if k != "sample_ids"}
        widths.append(batch["input_ids"].shape[1])
        labelled.append(int((batch["labels"][:, 1:] != -100).sum()) / batch_size)  # positions the head projects
        model(**batch, logits_at=logits_at).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    before = resident_bytes()
    step(0)  # warm-up
    start = time.perf_counter()
    for index in range(1, steps + 1):
        step(index)
    seconds = time.perf_counter() - start
    peak = resident_bytes("VmHWM")
    queue.put({"mode": mode, "samples_per_s": steps * batch_size / seconds, "peak_rss_gb": peak / 2**30,
               "step_gb": (peak - before) / 2**30, "tokens": max(widths),
               "projected": max(widths) if logits_at == "all" else round(sum(labelled) / len(labelled))})


def run_setup(targets: str, out: str, queue) -> None:
    """desta train's set-up on the table, in this process: its seconds and the resident memory it adds at its peak."""
    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.run import setup

    config = load_config(TrainConfig, None, [f"output_dir={out}", f"data.train={targets}", "optim.max_steps=1",
                                             "data.eval_fraction=0.01", "log.progress=false", "log.report_to=none"])
    before = resident_bytes()
    start = time.perf_counter()
    run = setup(config)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_gb": (resident_bytes("VmHWM") - before) / 2**30,
               "train_rows": run.counts["train_rows"]})


def startup(rows: int) -> None:
    """Time and memory of the set-up on a table of `rows` targets rows, twice (see the module's docstring)."""
    from datasets import Audio, Dataset, load_from_disk

    from desta.audio.synth import synth_corpus
    from desta.describe import DescribeConfig, describe
    from desta.targets import TargetsConfig
    from desta.targets import targets as write_targets

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = synth_corpus(tmp / "corpus", num_clips=16, seed=0, progress=False)
        describe(DescribeConfig(source=str(manifest), out=str(tmp / "d"), mapping="synthetic", progress=False))
        write_targets(TargetsConfig(source=str(tmp / "d" / "dataset"), out=str(tmp / "t"), kind="labels",
                                    progress=False))
        base = load_from_disk(str(tmp / "t" / "dataset")).remove_columns(["audio"]).to_list()
        wavs = sorted((tmp / "corpus").rglob("*.wav"))
        table = {key: [] for key in [*base[0], "audio"]}
        for k in range(rows):
            row = base[k % len(base)]
            for key, value in row.items():
                table[key].append(f"{value}-{k}" if key == "id" else value)
            table["audio"].append({"path": str(wavs[k % len(wavs)]), "bytes": None})
        Dataset.from_dict(table).cast_column("audio", Audio(decode=False)).save_to_disk(str(tmp / "big"))
        del table, base
        context = mp.get_context("spawn")
        results = []
        for _ in range(2):
            queue = context.Queue()
            process = context.Process(target=run_setup, args=(str(tmp / "big"), str(tmp / "run"), queue))
            process.start()
            results.append(queue.get())
            process.join()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"
    for name, r in zip(("first start", "restart"), results, strict=True):
        print(f"{name}: {r['seconds']:.1f} s, {r['peak_gb']:.2f} GiB more resident memory at the peak; "
              f"{r['train_rows']} training rows")
    print(json.dumps({"bench": "train-startup", "rows": rows, "machine": machine,
                      "first_start_s": round(results[0]["seconds"], 1), "restart_s": round(results[1]["seconds"], 1),
                      "first_start_peak_gb": round(results[0]["peak_gb"], 3),
                      "restart_peak_gb": round(results[1]["peak_gb"], 3)}))


def planned_step_gb(section, mode: str, batch_size: int, tokens: int, projected: int) -> float:
    """What `desta plan` predicts a step adds to the resident weights (GiB): activations, gradients, AdamW; the LM
    head projecting `projected` positions per row."""
    from desta.core.args import load_config
    from desta.train.plan import PlanConfig, plan

    settings = [f"model.encoder={section.encoder}", f"model.llm={section.llm}", "data.train=unused",
                f"model.pad_to_30s={mode == 'padded_30s'}", f"optim.batch_size={batch_size}", "optim.precision=fp32",
                f"tokens={tokens}", "clip_seconds=3.0", f"response_tokens={projected}"]
    parts = plan(load_config(PlanConfig, None, settings))["memory"][
        "1 gpu+checkpointing" if mode.endswith("checkpointing") else "1 gpu"]
    return (parts["total"] - parts["weights"] - 1.0) * 1e9 / 2**30  # without the CUDA context


def main() -> None:
    from desta.audio.synth import synth_corpus
    from desta.demo import SMALL_LLM, SMALL_WHISPER, small_models_dir
    from desta.describe import DescribeConfig, describe
    from desta.targets import TargetsConfig
    from desta.targets import targets as write_targets
    from desta.train.config import ModelSection
    from desta.train.data import load_targets
    from desta.train.features import cache_features
    from desta.train.run import build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--models", default=None)
    parser.add_argument("--startup", type=int, default=None, help="measure the set-up on a table of this many rows")
    args = parser.parse_args()
    if args.startup:
        return startup(args.startup)
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
        for mode in ("padded_30s", "variable", "cached", "cached+all_logits", "cached+checkpointing"):
            queue = context.Queue()
            process = context.Process(target=run_mode, args=(mode, targets, str(models) if models else None,
                                                             args.steps, args.batch_size, str(tmp / "cache"), queue))
            process.start()
            results[mode] = queue.get()
            process.join()
    for mode, r in results.items():
        r["planned_step_gb"] = planned_step_gb(section, mode, args.batch_size, r["tokens"], r["projected"])
    weights = "whisper-tiny.en + SmolLM2-135M-Instruct" if models else "tiny random"
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"
    print(f"{weights}; batch {args.batch_size}; {args.steps} timed steps; {machine}")
    for mode, r in results.items():
        print(f"{mode:>20}: {r['samples_per_s']:7.2f} samples/s, peak RSS {r['peak_rss_gb']:.2f} GiB, step memory "
              f"{r['step_gb']:.2f} GiB (desta plan: {r['planned_step_gb']:.2f}; rows of up to {r['tokens']} tokens, "
              f"{r['projected']} projected)")
    base = results["padded_30s"]["samples_per_s"]
    print(f"variable length: {results['variable']['samples_per_s'] / base:.1f}x, cached: "
          f"{results['cached']['samples_per_s'] / base:.1f}x the padded-to-30 s speed; building the cache took "
          f"{cache_seconds:.1f} s for {args.clips} clips")
    print(f"response-only logits: step memory {results['cached']['step_gb']:.2f} GiB against "
          f"{results['cached+all_logits']['step_gb']:.2f} GiB with every position's (cached features)")
    print(json.dumps({"bench": "train", "weights": weights, "machine": machine, "batch_size": args.batch_size,
                      "steps": args.steps, **{f"{m}_samples_per_s": round(r["samples_per_s"], 3)
                                              for m, r in results.items()},
                      **{f"{m}_peak_rss_gb": round(r["peak_rss_gb"], 3) for m, r in results.items()},
                      **{f"{m}_step_gb": round(r["step_gb"], 3) for m, r in results.items()},
                      **{f"{m}_planned_step_gb": round(r["planned_step_gb"], 3) for m, r in results.items()},
                      "cache_build_s": round(cache_seconds, 2)}))


if __name__ == "__main__":
    main()
