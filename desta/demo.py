"""`desta demo`: the whole DeSTA loop in one command, with a report to look at.

synthetic corpus -> describe -> targets (self-output) -> train -> eval (speech vs text reference)
-> export, on tiny random models by default (about a minute on 2 CPU cores) or on the small real
checkpoints with `models`. Writes one folder with every stage's output, report.md and report.html.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from desta.core.artifacts import (
    DATASET,
    LOSS_CURVE,
    MANIFEST,
    REJECTS,
    REPORT_JSON,
    REPORT_MD,
    SCORES_PLOT,
    WEIGHTS,
)

if TYPE_CHECKING:
    from datasets import Dataset

T = TypeVar("T")

SMALL_WHISPER = "whisper-tiny.en"
SMALL_LLM = "SmolLM2-135M-Instruct"
# Hub ids of the same checkpoints, for machines that reach the Hub.
SMALL_HUB_IDS = {SMALL_WHISPER: "openai/whisper-tiny.en", SMALL_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def small_models_dir(models_dir: str | os.PathLike | None = None) -> Path | None:
    """A folder holding both small real checkpoints (the argument, $DESTA_MODELS, or the default of
    tools/fetch_offline_models.sh), or None."""
    candidates = [models_dir, os.environ.get("DESTA_MODELS"), Path.home() / ".cache" / "desta-offline-models"]
    for candidate in candidates:
        if candidate and (Path(candidate) / SMALL_WHISPER / WEIGHTS).is_file() and (
                Path(candidate) / SMALL_LLM / WEIGHTS).is_file():
            return Path(candidate)
    return None


@dataclass
class DemoSize:
    """How big the demo's corpus, targets, training and evaluation are."""

    train_clips: int
    eval_clips: int
    max_new_tokens: int  # for the targets stage
    steps: int
    batch_size: int
    lr: float
    eval_tokens: int


TINY = DemoSize(train_clips=160, eval_clips=8, max_new_tokens=24, steps=60, batch_size=8, lr=1e-3, eval_tokens=16)
MINIMAL = DemoSize(train_clips=16, eval_clips=2, max_new_tokens=6, steps=4, batch_size=4, lr=1e-3, eval_tokens=4)
# 48 held-out clips (about 530 items): enough for an overall 95 % interval narrower than +-0.05.
# Rows per resumable chunk in describe and targets: the progress bars move (and estimate the time left) per chunk.
PROGRESS_CHUNK = 16
REAL = DemoSize(train_clips=200, eval_clips=48, max_new_tokens=96, steps=80, batch_size=8, lr=3e-4, eval_tokens=64)


@dataclass
class DemoConfig:
    """The whole DeSTA loop on a built-in tiny default: synth, describe, targets, train, eval, export, report."""

    out: str = "desta-demo"
    """folder for every stage's output"""
    models: str | None = None
    """folder holding whisper-tiny.en/ and SmolLM2-135M-Instruct/: the small real models"""
    minimal: bool = False
    """the smallest sizes (a smoke test in seconds)"""
    progress: bool = True
    """progress bars with rows, steps and ETA in every stage, and the training loss every few steps"""


class Stages:
    """Runs the demo's stages in order, printing each with its time."""

    def __init__(self, count: int, log: Callable[[str], None] = print):
        self.count, self.log, self.index, self.times = count, log, 0, {}

    def run(self, name: str, what: str, work: Callable[[], T], describe_result: Callable[[T], str]) -> T:
        """Run `work`, log the stage with `describe_result` of its result and its time, and return the result."""
        self.index += 1
        self.log(f"[{self.index}/{self.count}] {name}: {what}")
        started = time.perf_counter()
        result = work()
        self.times[name] = time.perf_counter() - started
        self.log(f"      {describe_result(result)} ({self.times[name]:.1f} s)")
        return result


def run_demo(out: str | Path = "desta-demo", models: str | Path | None = None, size: DemoSize | None = None,
             log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Every stage of the loop into `out`, each showing its progress (rows or steps, ETA) when `progress`; ends
    with where each output is. Returns the facts the report shows."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    real = models is not None
    size = size or (REAL if real else TINY)
    encoder, llm = _bases(out, models)
    stages = Stages(7, log)
    facts: dict[str, Any] = {"real": real, "encoder": encoder, "llm": llm}
    manifests = stages.run("synth", f"{size.train_clips} + {size.eval_clips} clips spoken by espeak-ng",
                           lambda: _synth(out, size, progress), lambda _: f"{out / 'corpus'}")
    facts.update(stages.run("describe", "attributes from the signal, labels from the metadata, Whisper ASR check",
                            lambda: _describe(out, manifests, encoder, progress), _describe_line))
    facts["targets"] = stages.run("targets", "the LLM answers \"What can you hear from the audio?\" from each "
                                  "description", lambda: _targets(out, llm, size, real, progress), _targets_line(real))
    facts["train"] = stages.run("train", f"{size.steps} steps of the Q-Former connector (LLM and Whisper frozen)",
                                lambda: _train(out, encoder, llm, size, progress),
                                lambda t: f"loss {t['first_train_loss']:.3f} -> {t['last_train_loss']:.3f}")
    facts["eval"] = stages.run("eval", "unseen instructions; speech model vs the LLM reading the gold description",
                               lambda: _eval(out, size, progress), _eval_line)
    facts["export"] = stages.run("export", "Hub-ready folder with a model card", lambda: _export(out, real),
                                 lambda e: f"{e['path']} ({e['bytes'] / 2**20:.2f} MiB)")
    facts["times"] = stages.times
    stages.run("report", "report.md and report.html", lambda: _report(out, facts),
               lambda _: f"{out / 'report.md'}, {out / 'report.html'}")
    log(f"done in {sum(stages.times.values()):.0f} s; the outputs:")
    for what, where in outputs(out):
        log(f"  {what:<22} {where}")
    return facts


def outputs(out: Path) -> list[tuple[str, str]]:
    """What the demo leaves in `out` and where, in pipeline order, for the run's last lines."""
    return [("corpus (manifests)", f"{out / 'corpus' / 'train' / MANIFEST}, {out / 'corpus' / 'eval' / MANIFEST}"),
            ("described clips", f"{out / 'described' / DATASET}, {out / 'described-eval' / DATASET}"),
            ("targets", f"{out / 'targets' / DATASET} (rejected: {out / 'targets' / REJECTS})"),
            ("trained checkpoint", f"{out / 'train'} (loss curve: {out / 'train' / LOSS_CURVE})"),
            ("eval report", f"{out / 'eval' / REPORT_MD} ({out / 'eval' / SCORES_PLOT}, {out / 'eval' / REPORT_JSON})"),
            ("exported model", f"{out / 'export'}"),
            ("demo report", f"{out / 'report.html'} ({out / 'report.md'})")]


def _bases(out: Path, models: str | Path | None) -> tuple[str, str]:
    """The Whisper and LLM folders: the small real pair, or tiny random models written into `out`."""
    from desta.model.tiny import save_tiny_bases

    if models is None:
        whisper_dir, llm_dir = save_tiny_bases(out / "bases")
        return str(whisper_dir), str(llm_dir)
    folder = small_models_dir(models)
    if folder is None:
        downloads = "; ".join(f"hf download {hub} --local-dir {Path(models) / name}" for name, hub in
                              SMALL_HUB_IDS.items())
        raise FileNotFoundError(f"{models} does not hold {SMALL_WHISPER}/ and {SMALL_LLM}/; download them: {downloads}")
    return str(folder / SMALL_WHISPER), str(folder / SMALL_LLM)


def _synth(out: Path, size: DemoSize, progress: bool) -> tuple[Path, Path]:
    from desta.audio.synth import synth_corpus

    return (synth_corpus(out / "corpus" / "train", num_clips=size.train_clips, seed=0, progress=progress),
            synth_corpus(out / "corpus" / "eval", num_clips=size.eval_clips, seed=1, progress=progress))


def _describe(out: Path, manifests: tuple[Path, Path], encoder: str, progress: bool) -> dict[str, Any]:
    from datasets import load_from_disk

    from desta.core.chunks import ChunkingSection
    from desta.describe import DescribeConfig, describe

    chunking = ChunkingSection(chunk_size=PROGRESS_CHUNK)
    described = describe(DescribeConfig(source=str(manifests[0]), out=str(out / "described"), mapping="synthetic",
                                        chunking=chunking, progress=progress))
    held_out = describe(DescribeConfig(source=str(manifests[1]), out=str(out / "described-eval"),
                                       mapping="synthetic", chunking=chunking, progress=progress))
    asr = _asr_check(encoder, load_from_disk(str(out / "described-eval" / DATASET)), progress=progress)
    return {"described": described, "held_out": held_out, "asr": asr}


def _describe_line(facts: dict[str, Any]) -> str:
    d, asr = facts["described"], facts["asr"]
    return (f"inputs {d['inputs']} = described {d['described']} + rejected {d['rejected']}; Whisper WER on "
            f"{asr['clips']} clips: {asr['wer']:.2f}")


def _targets(out: Path, llm: str, size: DemoSize, real: bool, progress: bool) -> dict[str, Any]:
    from desta.core.chunks import ChunkingSection
    from desta.core.generation import GenerationSection, SamplingSection
    from desta.targets import TargetsConfig, targets

    return targets(TargetsConfig(source=str(out / "described" / DATASET), out=str(out / "targets"),
                                 generation=GenerationSection(model=llm),
                                 sampling=SamplingSection(size.max_new_tokens, repetition_penalty=1.2 if real else 1.0),
                                 keep_flagged=not real, trim_cut_off=real,
                                 chunking=ChunkingSection(chunk_size=PROGRESS_CHUNK), progress=progress))


def _targets_line(real: bool):
    return lambda t: (f"prompts {t['inputs']} = kept {t['kept']} + rejected {t['rejected']}"
                      + ("" if real else " (tiny random LLM: flagged answers kept)"))


def _train(out: Path, encoder: str, llm: str, size: DemoSize, progress: bool) -> dict[str, Any]:
    from desta.core.args import load_config
    from desta.train.config import TrainConfig
    from desta.train.run import train

    return train(load_config(TrainConfig, None, [
        f"output_dir={out / 'train'}", f"model.encoder={encoder}", f"model.llm={llm}",
        f"data.train={out / 'targets' / DATASET}", "data.eval_fraction=0.1", f"optim.max_steps={size.steps}",
        f"optim.batch_size={size.batch_size}", f"optim.lr={size.lr}", f"optim.warmup_steps={max(1, size.steps // 10)}",
        f"log.logging_steps={max(1, size.steps // 20)}", f"log.eval_steps={max(1, size.steps // 4)}",
        f"log.save_steps={size.steps}", "log.report_to=none", f"log.progress={str(progress).lower()}",
        "data.max_length=512"]))


def _eval(out: Path, size: DemoSize, progress: bool) -> dict[str, Any]:
    from desta.evaluation import EvalConfig, EvalSetConfig, evaluate, write_eval_set

    write_eval_set(EvalSetConfig(source=str(out / "described-eval" / DATASET), out=str(out / "evalset")))
    return evaluate(EvalConfig(checkpoints=[str(out / "train")], eval_set=str(out / "evalset"), out=str(out / "eval"),
                               max_new_tokens=size.eval_tokens, probe_max_new_tokens=size.eval_tokens,
                               progress=progress))


def _eval_line(report: dict[str, Any]) -> str:
    overall = report["overall"]["values"]
    return (f"{report['items']} items; overall speech {overall['speech']:.3f}, text-ASR "
            f"{overall.get('text_asr') or 0:.3f}, text-gold {overall['text']:.3f}")


def _export(out: Path, real: bool) -> dict[str, Any]:
    """The trained model as a Hub-ready folder (replacing an earlier run's): the real bases named by their Hub ids;
    the tiny ones by folder name, found in OUT/bases when the export loads."""
    from desta.export import export, files_to_upload

    ids = {"encoder_id": SMALL_HUB_IDS[SMALL_WHISPER], "llm_id": SMALL_HUB_IDS[SMALL_LLM]} if real else {}
    exported = export(out / "train", out / "export", report=out / "eval" / REPORT_JSON, overwrite=True, **ids)
    return {"path": str(exported), "bytes": sum(s for _, s in files_to_upload(exported))}


def _report(out: Path, facts: dict[str, Any]) -> None:
    (out / "demo_summary.json").write_text(json.dumps(facts, indent=2, default=str))
    samples = _samples(out)
    (out / "report.md").write_text(render_report_md(facts, samples))
    (out / "report.html").write_text(render_report_html(facts, samples))


def _asr_check(encoder: str, dataset: Dataset, clips: int = 16, progress: bool = False) -> dict[str, Any]:
    """Whisper's word error rate on a few held-out clips (their transcripts are known)."""
    from tqdm import tqdm

    from desta.audio import load_audio_ref
    from desta.audio.asr import TransformersWhisper
    from desta.evaluation.scoring import word_error_rate

    rows = list(dataset.select(range(min(clips, len(dataset)))))
    whisper = TransformersWhisper(encoder, max_new_tokens=64)
    heard: list[str] = []
    for start in tqdm(range(0, len(rows), 4), desc="Whisper ASR check (4 clips a batch)", disable=not progress):
        heard += whisper([load_audio_ref(r["audio"]) for r in rows[start : start + 4]])
    wers = [word_error_rate(r["transcript"], h) for r, h in zip(rows, heard, strict=True)]
    return {"clips": len(rows), "wer": sum(wers) / len(wers), "example": {"gold": rows[0]["transcript"],
                                                                          "heard": heard[0][:120]}}


def _samples(out: Path, count: int = 3) -> list[dict[str, str]]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "targets" / DATASET))
    return [{"description": r["description"], "prompt": r["prompt"], "response": r["response"]}
            for r in dataset.select(range(min(count, len(dataset))))]


def _data_rows(facts: dict) -> list[list[str]]:
    d, h, t = facts["described"], facts["held_out"], facts["targets"]
    return [["train clips", str(d["inputs"]), str(d["described"]), str(d["rejected"]), f"{d['hours'] * 60:.1f} min"],
            ["held-out clips", str(h["inputs"]), str(h["described"]), str(h["rejected"]), f"{h['hours'] * 60:.1f} min"],
            ["targets (prompts)", str(t["inputs"]), str(t["kept"]), str(t["rejected"]), ""]]


EVAL_HEAD = ["category", "n", "speech model", "text-ASR (Whisper transcript)", "text-gold (gold transcript)",
             "forgetting vs text-ASR (connector)", "forgetting vs text-gold"]


def _eval_rows(report: dict) -> list[list[str]]:
    """The eval table's rows: scores and forgetting rates with their 95 % intervals."""
    from desta.evaluation.report import format_cell as cell

    rows = []
    for category, row in list(report["categories"].items()) + [("overall", report["overall"])]:
        rows.append([category, str(row["n"]), cell(row, "speech"), cell(row, "text_asr"), cell(row, "text"),
                     cell(row, "forgetting_asr:speech", True), cell(row, "forgetting:speech", True)])
    return rows


def render_report_md(facts: dict, samples: list[dict[str, str]]) -> str:
    """The demo report as Markdown: stage times, data counts, sample targets, training and evaluation."""
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
              "| " + " | ".join(EVAL_HEAD) + " |", "|" + "---|" * len(EVAL_HEAD)]
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
    """The demo report as one HTML page, with the same sections as the Markdown report."""
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
{_table(EVAL_HEAD, _eval_rows(facts["eval"]))}
<img src="eval/scores.png" alt="scores per category">
<h2>Export</h2><p><code>{html.escape(facts['export']['path'])}</code>:
{facts['export']['bytes'] / 2**20:.2f} MiB (trainable weights, config, processor, model card)</p>
</body></html>
"""


def demo(config: DemoConfig) -> dict[str, Any]:
    """`desta demo`: run the whole loop into config.out and return the facts the report shows."""
    return run_demo(config.out, models=config.models, size=MINIMAL if config.minimal else None,
                    progress=config.progress)
