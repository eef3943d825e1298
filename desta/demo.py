"""`desta demo`: the whole DeSTA loop in one command, with a report to look at.

synthetic corpus -> describe -> targets (self-output) -> train -> eval (speech vs text reference)
-> export, on tiny random models by default (about a minute on 2 CPU cores) or on the real small
checkpoints with `models`. Writes one folder with every stage's output, report.md and report.html.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class DemoSize:
    train_clips: int
    eval_clips: int
    max_new_tokens: int  # for the targets stage
    steps: int
    batch_size: int
    lr: float
    eval_tokens: int


TINY = DemoSize(train_clips=160, eval_clips=8, max_new_tokens=24, steps=60, batch_size=8, lr=1e-3, eval_tokens=16)
MINIMAL = DemoSize(train_clips=16, eval_clips=2, max_new_tokens=6, steps=4, batch_size=4, lr=1e-3, eval_tokens=4)
REAL = DemoSize(train_clips=200, eval_clips=6, max_new_tokens=96, steps=80, batch_size=8, lr=3e-4, eval_tokens=64)


def run_demo(out: str | Path = "desta-demo", models: str | Path | None = None, size: DemoSize | None = None,
             log=print) -> dict[str, Any]:
    import datasets
    from datasets import load_from_disk
    from transformers.utils import logging as hf_logging

    from desta.config import load_config
    from desta.describe import DescribeConfig, describe
    from desta.evaluate import EvalConfig, build_eval_set, evaluate, save_eval_set
    from desta.export import export, files_to_upload
    from desta.synth import synth_corpus
    from desta.targets import TargetsConfig, targets
    from desta.testing import REAL_LLM, REAL_WHISPER, real_models_dir, save_tiny_bases
    from desta.train import TrainConfig, train

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    real = models is not None
    size = size or (REAL if real else TINY)
    if real:
        folder = real_models_dir(models)
        if folder is None:
            raise FileNotFoundError(f"{models} does not hold {REAL_WHISPER}/ and {REAL_LLM}/; build them with "
                                    "fetch_offline_models.sh or download them from the Hub")
        encoder, llm = str(folder / REAL_WHISPER), str(folder / REAL_LLM)
    else:
        whisper_dir, llm_dir = save_tiny_bases(out / "bases")
        encoder, llm = str(whisper_dir), str(llm_dir)
    times: dict[str, float] = {}
    stages = 7

    def stage(index: int, name: str, what: str):
        log(f"[{index}/{stages}] {name}: {what}")
        return time.perf_counter()

    def done(name: str, started: float, detail: str) -> None:
        times[name] = time.perf_counter() - started
        log(f"      {detail} ({times[name]:.1f} s)")

    started = stage(1, "synth", f"{size.train_clips} + {size.eval_clips} clips spoken by espeak-ng")
    train_manifest = synth_corpus(out / "corpus" / "train", num_clips=size.train_clips, seed=0, progress=False)
    eval_manifest = synth_corpus(out / "corpus" / "eval", num_clips=size.eval_clips, seed=1, progress=False)
    done("synth", started, f"{out / 'corpus'}")

    started = stage(2, "describe", "attributes from the signal, labels from the metadata, Whisper ASR check")
    described = describe(DescribeConfig(source=str(train_manifest), out=str(out / "described"),
                                        mapping="synthetic", progress=False))
    held_out = describe(DescribeConfig(source=str(eval_manifest), out=str(out / "described-eval"),
                                       mapping="synthetic", progress=False))
    asr = _asr_check(encoder, load_from_disk(str(out / "described-eval" / "dataset")))
    done("describe", started, f"inputs {described['inputs']} = described {described['described']} + rejected "
                              f"{described['rejected']}; Whisper WER on {asr['clips']} clips: {asr['wer']:.2f}")

    started = stage(3, "targets", "the LLM answers \"What can you hear from the audio?\" from each description")
    target_summary = targets(TargetsConfig(
        source=str(out / "described" / "dataset"), out=str(out / "targets"), model=llm,
        max_new_tokens=size.max_new_tokens, repetition_penalty=1.2 if real else 1.0,
        keep_flagged=not real, trim_cut_off=real, progress=False))
    done("targets", started, f"prompts {target_summary['inputs']} = kept {target_summary['kept']} + rejected "
                             f"{target_summary['rejected']}" + ("" if real else
                                                                " (tiny random LLM: flagged answers kept)"))

    started = stage(4, "train", f"{size.steps} steps of the Q-Former connector (LLM and Whisper frozen)")
    train_summary = train(load_config(TrainConfig, None, [
        f"output_dir={out / 'train'}", f"model.encoder={encoder}", f"model.llm={llm}",
        f"data.train={out / 'targets' / 'dataset'}", "data.eval_fraction=0.1", f"optim.max_steps={size.steps}",
        f"optim.batch_size={size.batch_size}", f"optim.lr={size.lr}", f"optim.warmup_steps={max(1, size.steps // 10)}",
        f"log.logging_steps={max(1, size.steps // 20)}", f"log.eval_steps={max(1, size.steps // 4)}",
        f"log.save_steps={size.steps}", "log.report_to=none", "log.progress=false", "data.max_length=512"]))
    done("train", started, f"loss {train_summary['first_train_loss']:.3f} -> {train_summary['last_train_loss']:.3f}")

    started = stage(5, "eval", "unseen instructions; speech model vs the LLM reading the gold description")
    items = build_eval_set(load_from_disk(str(out / "described-eval" / "dataset")))
    save_eval_set(items, out / "evalset")
    report = evaluate(EvalConfig(checkpoints=[str(out / "train")], eval_set=str(out / "evalset"),
                                 out=str(out / "eval"), max_new_tokens=size.eval_tokens,
                                 probe_max_new_tokens=size.eval_tokens, progress=False))
    overall = report["overall"]
    done("eval", started, f"{report['items']} items; overall speech {overall['train']:.3f} vs text "
                          f"{overall['text']:.3f}")

    started = stage(6, "export", "Hub-ready folder with a model card")
    exported = export(out / "train", out / "export", report=out / "eval" / "report.json")
    export_bytes = sum(s for _, s in files_to_upload(exported))
    done("export", started, f"{exported} ({export_bytes / 2**20:.2f} MiB)")

    started = stage(7, "report", "report.md and report.html")
    facts = {"real": real, "encoder": encoder, "llm": llm, "described": described, "held_out": held_out,
             "asr": asr, "targets": target_summary, "train": train_summary, "eval": report, "times": times,
             "export": {"path": str(exported), "bytes": export_bytes}}
    (out / "demo_summary.json").write_text(json.dumps(facts, indent=2, default=str))
    samples = _samples(out)
    (out / "report.md").write_text(render_report_md(facts, samples))
    (out / "report.html").write_text(render_report_html(facts, samples))
    done("report", started, f"{out / 'report.md'}, {out / 'report.html'}")
    log(f"done in {sum(times.values()):.0f} s: open {out / 'report.html'}")
    return facts


def _asr_check(encoder: str, dataset, clips: int = 16) -> dict[str, Any]:
    """Whisper's word error rate on a few held-out clips (their transcripts are known)."""
    from desta.asr import TransformersWhisper
    from desta.audio import load_audio_ref
    from desta.scoring import word_error_rate

    rows = list(dataset.select(range(min(clips, len(dataset)))))
    heard = TransformersWhisper(encoder, max_new_tokens=64)(
        [load_audio_ref(r["audio"]) for r in rows])
    wers = [word_error_rate(r["transcript"], h) for r, h in zip(rows, heard, strict=True)]
    return {"clips": len(rows), "wer": sum(wers) / len(wers), "example": {"gold": rows[0]["transcript"],
                                                                          "heard": heard[0][:120]}}


def _samples(out: Path, count: int = 3) -> list[dict[str, str]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "targets" / "dataset"))
    return [{"description": r["description"], "prompt": r["prompt"], "response": r["response"]}
            for r in dataset.select(range(min(count, len(dataset))))]


def _data_rows(facts: dict) -> list[list[str]]:
    d, h, t = facts["described"], facts["held_out"], facts["targets"]
    return [["train clips", str(d["inputs"]), str(d["described"]), str(d["rejected"]), f"{d['hours'] * 60:.1f} min"],
            ["held-out clips", str(h["inputs"]), str(h["described"]), str(h["rejected"]), f"{h['hours'] * 60:.1f} min"],
            ["targets (prompts)", str(t["inputs"]), str(t["kept"]), str(t["rejected"]), ""]]


def _eval_rows(report: dict) -> list[list[str]]:
    def fmt(value, percent=False):
        return "n/a" if value is None else (f"{value:+.0%}" if percent else f"{value:.2f}")

    rows = []
    for category, row in list(report["categories"].items()) + [("overall", report["overall"])]:
        rows.append([category, fmt(row.get("train")), fmt(row.get("text")), fmt(row.get("forgetting:train"), True)])
    return rows


def render_report_md(facts: dict, samples: list[dict[str, str]]) -> str:
    kind = "real Whisper tiny.en + SmolLM2-135M-Instruct" if facts["real"] else "tiny random models"
    lines = [f"# desta demo ({kind})", "",
             "synthetic corpus -> describe -> targets -> train -> eval -> export", "",
             "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in facts["times"].items()]
    lines += ["", "## Data", "", "| set | inputs | kept | rejected | audio |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _data_rows(facts)]
    asr = facts["asr"]
    lines += ["", f"Whisper ASR check on {asr['clips']} held-out clips: WER {asr['wer']:.2f} "
                  f"(gold \"{asr['example']['gold']}\", heard \"{asr['example']['heard']}\").", "",
              "## Sample descriptions and targets", ""]
    for sample in samples:
        lines += [f"- description: `{sample['description']}`", f"  - prompt: {sample['prompt']}",
                  f"  - target: {sample['response'][:300]}"]
    t = facts["train"]
    lines += ["", "## Training", "", f"{t['steps']} steps, {t['train_rows']} rows, {t['samples_per_second']} "
              f"samples/s; loss {t['first_train_loss']:.3f} -> {t['last_train_loss']:.3f}; validation "
              + ", ".join(f"{v:.3f}" for _, v in t["eval_losses"]), "", "![loss curve](train/loss_curve.png)", "",
              "## Evaluation on unseen instructions", "",
              "| category | speech model | text reference | forgetting |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _eval_rows(facts["eval"])]
    lines += ["", "![scores](eval/scores.png)", "", "## Export", "",
              f"`{facts['export']['path']}`: {facts['export']['bytes'] / 2**20:.2f} MiB "
              "(trainable weights, config, processor, model card)", ""]
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def render_report_html(facts: dict, samples: list[dict[str, str]]) -> str:
    kind = "real Whisper tiny.en + SmolLM2-135M-Instruct" if facts["real"] else "tiny random models"
    t, asr = facts["train"], facts["asr"]
    sample_html = "".join(
        f"<li><code>{html.escape(s['description'])}</code><br><b>{html.escape(s['prompt'])}</b> "
        f"&rarr; {html.escape(s['response'][:300])}</li>" for s in samples)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>desta demo</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
code {{ font-size: 0.85rem; }} li {{ margin-bottom: 0.6rem; }}
</style></head><body>
<h1>desta demo <small>({html.escape(kind)})</small></h1>
<p>synthetic corpus &rarr; describe &rarr; targets &rarr; train &rarr; eval &rarr; export</p>
<h2>Stages</h2>{_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in facts["times"].items()])}
<h2>Data</h2>{_table(["set", "inputs", "kept", "rejected", "audio"], _data_rows(facts))}
<p>Whisper ASR check on {asr['clips']} held-out clips: WER {asr['wer']:.2f}.</p>
<h2>Sample descriptions and targets</h2><ul>{sample_html}</ul>
<h2>Training</h2><p>{t['steps']} steps, {t['train_rows']} rows, {t['samples_per_second']} samples/s;
loss {t['first_train_loss']:.3f} &rarr; {t['last_train_loss']:.3f}.</p>
<img src="train/loss_curve.png" alt="loss curve">
<h2>Evaluation on unseen instructions</h2>
{_table(["category", "speech model", "text reference", "forgetting"], _eval_rows(facts["eval"]))}
<img src="eval/scores.png" alt="scores per category">
<h2>Export</h2><p><code>{html.escape(facts['export']['path'])}</code>:
{facts['export']['bytes'] / 2**20:.2f} MiB (trainable weights, config, processor, model card)</p>
</body></html>
"""
