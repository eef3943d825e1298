"""What a speech run's LoRA costs its LLM in text: the LLM of each speech checkpoint (LoRA merged, no audio, no
system prompt) against the frozen base LLM on the retention sets of `desta posttrain` (200 general requests
with an IFEval instruction each, and the base model's own greedy answers to 200 more), item by item, with
95 % paired bootstrap intervals. The speech eval's own text probe has 8 prompts; this one has 25 times more.

    python recipes/experiments/hearing/retention.py qwen-lora=runs/experiments/hearing/qwen-lora \
        self-lora=runs/experiments/hearing/self-lora --out recipes/experiments/hearing/results

Writes retention.md and retention.json under --out; each model's per-item scores are kept under --work
(default runs/experiments/hearing/retention) and reused when the script runs again with the same settings.
About 3 minutes a model on one CPU core (bf16 generation, float32 likelihoods).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from desta.core.chunks import write_atomic
from desta.core.digests import fingerprint
from desta.core.generation import TransformersBackend
from desta.core.llm import load_chat_llm
from desta.core.stats import mean_interval
from desta.model.loading import load
from desta.posttrain.config import RetentionSection
from desta.posttrain.report import delta_stats
from desta.posttrain.retention import means, measure, reference_answers, retention_sets

MEASURES = ("format_following", "own_answer_loglik", "heldout_loglik")


def text_llm(checkpoint: str) -> tuple[torch.nn.Module, object]:
    """The speech checkpoint's LLM with its LoRA merged into the weights, and its tokenizer."""
    model, processor = load(checkpoint)
    llm = model.llm
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    return llm.eval(), processor.tokenizer


def scores_of(name: str, backend: TransformersBackend, sets: dict, references: list[str], settings: dict,
              work: Path, max_new_tokens: int) -> dict[str, list[float]]:
    """Per-item scores of one model, kept in work/<name>.json under the settings' digest."""
    path = work / f"{name}.json"
    digest = fingerprint(settings)
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("digest") == digest:
            print(f"{name}: measured earlier with the same settings, kept")
            return kept["scores"]
    scores, _ = measure(backend, [], None, sets, references, max_new_tokens, max_new_tokens,
                        log=lambda line: print(f"{name}:{line}"))
    write_atomic(path, json.dumps({"digest": digest, "settings": settings, "scores": scores}))
    return scores


def main() -> None:
    """Measure the base LLM and each run's LLM on the retention sets; write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=CHECKPOINT of each speech run with LoRA")
    parser.add_argument("--llm", default=None, help="the frozen base LLM (default: the first run's config)")
    parser.add_argument("--out", default="recipes/experiments/hearing/results")
    parser.add_argument("--work", default="runs/experiments/hearing/retention")
    parser.add_argument("--size", type=int, default=200, help="format requests and own-answer requests each")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    malformed = [run for run in args.runs if "=" not in run]
    if malformed:
        parser.error(f"runs must be NAME=CHECKPOINT, got {malformed}")
    runs = dict(run.split("=", 1) for run in args.runs)
    missing = [f"{name}={folder}" for name, folder in runs.items() if not (Path(folder) / "config.json").is_file()]
    if missing:
        parser.error(f"not a saved speech model (no config.json): {missing}; give the folder desta train wrote")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    first = Path(next(iter(runs.values())))
    base_name = args.llm or json.loads((first / "config.json").read_text())["llm_name_or_path"]
    section = RetentionSection(format_size=args.size, own_answer_size=args.size, refusal_size=0,
                               own_answer_max_new_tokens=args.max_new_tokens)
    sets = retention_sets(section)
    settings = {"base": str(base_name), "size": args.size, "max_new_tokens": args.max_new_tokens}

    def backend_of(llm: torch.nn.Module, tokenizer: object) -> TransformersBackend:
        return TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=48, device="cpu",
                                   autocast=torch.bfloat16)

    base_backend = backend_of(*load_chat_llm(base_name, device="cpu", dtype=torch.float32))
    references_path = work / "references.json"
    if references_path.is_file() and json.loads(references_path.read_text())["settings"] == settings:
        references = json.loads(references_path.read_text())["answers"]
    else:
        print(f"base: reference answers to {len(sets['own_answer'])} general requests")
        references = reference_answers(base_backend, sets["own_answer"], args.max_new_tokens)
        write_atomic(references_path, json.dumps({"settings": settings, "answers": references}))
    base = scores_of("base", base_backend, sets, references, settings, work, args.max_new_tokens)
    del base_backend
    report = {"base_llm": str(base_name), "settings": settings, "base": means(base), "runs": {}, "paired": {}}
    scores = {}
    for name, checkpoint in runs.items():
        scores[name] = scores_of(name, backend_of(*text_llm(checkpoint)), sets, references,
                                 {**settings, "checkpoint": str(Path(checkpoint).resolve())}, work,
                                 args.max_new_tokens)
        report["runs"][name] = {"checkpoint": checkpoint, "means": means(scores[name]),
                                "deltas": {k: v for k, v in delta_stats(base, [scores[name]]).items()
                                           if k in MEASURES}}
    names = list(scores)
    for i, first in enumerate(names):  # every pair of runs, item by item
        for second in names[i + 1:]:
            differences = {m: np.asarray(scores[first][m], dtype=float) - np.asarray(scores[second][m], dtype=float)
                           for m in MEASURES}
            report["paired"][f"{first} - {second}"] = {
                m: dict(zip(("value", "low", "high"), mean_interval(d), strict=True)) for m, d in differences.items()}
    write_atomic(out / "retention.json", json.dumps(report, indent=1))
    write_atomic(out / "retention.md", render(report))
    print(render(report))


def render(report: dict) -> str:
    """The table: each run's text scores and their change from the frozen base LLM, with intervals."""
    def cell(stat: dict) -> str:
        low, high = stat["ci"]
        noise = " ~" if low <= 0 <= high else ""
        return f"{stat['value']:+.3f} [{low:+.3f}, {high:+.3f}]{noise}"

    base = report["base"]
    lines = [f"# Text retention of the speech runs' LLM ({Path(report['base_llm']).name}, LoRA merged, no audio)",
             "",
             f"{report['settings']['size']} general requests with an IFEval instruction (format following) and "
             f"the base model's greedy answers (up to {report['settings']['max_new_tokens']} tokens) to "
             f"{report['settings']['size']} more (own-answer log-likelihood, nats per token); 5 held-out texts. "
             "Change from the base LLM, item by item, 95 % paired bootstrap interval; ~: inside the noise.",
             "",
             "| model | format following | change | own-answer log-lik | change | held-out log-lik | change |",
             "|---|---|---|---|---|---|---|",
             f"| base (frozen) | {base['format_following']:.3f} | | {base['own_answer_loglik']:.3f} | | "
             f"{base['heldout_loglik']:.3f} | |"]
    for name, run in report["runs"].items():
        m, d = run["means"], run["deltas"]
        lines.append(f"| {name} | {m['format_following']:.3f} | {cell(d['format_following'])} | "
                     f"{m['own_answer_loglik']:.3f} | {cell(d['own_answer_loglik'])} | {m['heldout_loglik']:.3f} | "
                     f"{cell(d['heldout_loglik'])} |")
    if report["paired"]:
        lines += ["", "Between the runs, item by item (95 % paired bootstrap interval):", "",
                  "| difference | format following | own-answer log-lik | held-out log-lik |", "|---|---|---|---|"]
        for pair, stats in report["paired"].items():
            lines.append(f"| {pair} | " + " | ".join(
                cell({"value": stats[m]["value"], "ci": [stats[m]["low"], stats[m]["high"]]}) for m in MEASURES)
                + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
