"""Stage 4, eval: unseen speech instructions, scored for the speech model and the text reference.

`build_eval_set` turns a described dataset (gold attributes) into eval items: closed questions per
attribute, transcription, verifiable format instructions and open questions, with instructions
from `desta.prompts.EVAL_INSTRUCTIONS` (never in a training pool). `evaluate` runs one or more
checkpoints on the items with batched generation, runs the same LLM reading the gold description
(the text reference), scores both, and writes OUT/report.json, OUT/report.md and OUT/scores.png.
Forgetting per category is (speech - text) / text, as Speech-IFEval defines it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from desta.core.args import raise_problems
from desta.core.artifacts import REPORT_JSON, REPORT_MD, SCORES_PLOT
from desta.core.generation import Backend, SamplingSettings, TransformersBackend
from desta.core.instructions import check_format
from desta.prompts import EVAL_INSTRUCTIONS, text_turn
from desta.scoring import score_label, score_number, score_transcript

CLOSED = ("gender", "accent", "emotion", "speaking_speed", "pitch", "volume")
ITEM_COLUMNS = ["item_id", "id", "category", "instruction", "answer", "choices", "check", "description"]
JUDGE_PROMPT = ("You are grading an answer about an audio clip. The clip's description is:\n{description}\n\n"
                "Question: {instruction}\nAnswer: {answer}\n\nIs the answer accurate and relevant to the clip? "
                "Reply with YES or NO only.")

# Column mappings for public benchmarks, once downloaded (`desta eval-set --columns ...`).
BENCHMARK_COLUMNS = {
    "dynamic-superb": {"audio": "audio", "instruction": "instruction", "answer": "label"},
    "mmau": {"audio": "audio", "instruction": "question", "answer": "answer", "choices": "choices"},
    "air-bench": {"audio": "audio", "instruction": "question", "answer": "answer_gt", "choices": "choices"},
}


def build_eval_set(described, seed: int = 0, categories: list[str] | None = None) -> list[dict[str, Any]]:
    """Eval items from a described dataset: one per (clip, category) the clip's gold data supports."""
    rng = np.random.default_rng(seed)
    wanted = categories or list(EVAL_INSTRUCTIONS)
    unknown = sorted(set(wanted) - set(EVAL_INSTRUCTIONS))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {sorted(EVAL_INSTRUCTIONS)}")
    columns = described.column_names
    label_sets = {a: sorted({v for v in described[a] if v}) for a in CLOSED if a in columns}
    items = []
    for row in described:
        for category in wanted:
            item = _item(row, category, label_sets, rng)
            if item is not None:
                item.update(item_id=f"{row['id']}:{category}", id=row["id"], category=category,
                            description=row["description"], audio=row["audio"])
                items.append(item)
    return items


def _item(row: dict, category: str, label_sets: dict[str, list[str]], rng) -> dict | None:
    template = EVAL_INSTRUCTIONS[category][0]
    if category in CLOSED:
        labels = label_sets.get(category, [])
        if not row.get(category) or len(labels) < 2:
            return None  # no gold label, or nothing to tell apart
        return {"instruction": template.format(labels=", ".join(labels)), "answer": row[category],
                "choices": labels, "check": None}
    if category == "duration":
        return {"instruction": template, "answer": f"{row['duration']:.2f}", "choices": None, "check": None}
    if category == "transcription":
        return {"instruction": template, "answer": row["transcript"], "choices": None, "check": None}
    if category == "open":
        return {"instruction": template, "answer": None, "choices": None, "check": None}
    n = int(rng.integers(2, 5)) if category == "format_bullets" else int(rng.integers(8, 16))
    prefix = str(rng.choice(["In this recording", "The clip", "Here is what I hear"]))
    check = {"format_json": {"kind": "json_keys", "keys": ["gender", "transcript"]},
             "format_words": {"kind": "max_words", "n": n}, "format_lowercase": {"kind": "lowercase"},
             "format_prefix": {"kind": "prefix", "prefix": prefix},
             "format_bullets": {"kind": "bullets", "n": n}}[category]
    return {"instruction": template.format(n=n, prefix=prefix), "answer": None, "choices": None, "check": check}


def save_eval_set(items: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    from datasets import Audio, Dataset

    table = {name: [item[name] for item in items] for name in ITEM_COLUMNS}
    table["choices"] = [json.dumps(c) if c is not None else None for c in table["choices"]]
    table["check"] = [json.dumps(c) if c is not None else None for c in table["check"]]
    table["audio"] = [item["audio"] for item in items]
    dataset = Dataset.from_dict(table).cast_column("audio", Audio(decode=False))
    dataset.save_to_disk(str(out))
    return Path(out)


@dataclass
class EvalSetConfig:
    """Build an eval set of unseen instructions from a described dataset with gold attributes."""

    source: str
    """described dataset folder (OUT/dataset of desta describe)"""
    out: str
    """eval set folder to write"""
    categories: list[str] | None = None
    """subset of the categories (gender, accent, ..., format_*, open); null: all"""
    max_clips: int | None = None
    """use at most this many clips (the first by id)"""
    seed: int = 0
    """the instructions drawn and their numbers depend only on it"""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.categories or []) - set(EVAL_INSTRUCTIONS))
        problems = [("categories", f"unknown {unknown}; choose from {sorted(EVAL_INSTRUCTIONS)}")] if unknown else []
        if self.max_clips is not None and self.max_clips < 1:
            problems.append(("max_clips", f"must be at least 1, got {self.max_clips}"))
        raise_problems(problems)


def write_eval_set(config: EvalSetConfig) -> dict[str, int]:
    """Build and save the eval set; returns the item count per category."""
    from datasets import load_from_disk

    if not Path(config.source).is_dir():
        raise FileNotFoundError(f"{config.source} not found; give the dataset folder written by desta describe")
    items = build_eval_set(load_from_disk(config.source), seed=config.seed, categories=config.categories)
    if config.max_clips:
        keep = set(sorted({i["id"] for i in items})[: config.max_clips])
        items = [i for i in items if i["id"] in keep]
    save_eval_set(items, config.out)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    return counts


def load_eval_set(path: str | os.PathLike, columns: dict[str, str] | None = None):
    """An eval set written by `desta eval-set`, or any dataset with audio / instruction / answer columns
    (`columns` maps our names to its names, e.g. BENCHMARK_COLUMNS["mmau"])."""
    from datasets import load_from_disk

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"eval set {path} not found; build one with `desta eval-set`")
    dataset = load_from_disk(str(path))
    if columns:
        dataset = dataset.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})
        extra = {"item_id": [f"item-{i}" for i in range(len(dataset))], "category": ["benchmark"] * len(dataset)}
        for name, values in extra.items():
            if name not in dataset.column_names:
                dataset = dataset.add_column(name, values)
    missing = [c for c in ("item_id", "category", "instruction", "answer", "audio") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path} is not an eval set: no column {missing} (columns: {dataset.column_names}); "
                         "build it with `desta eval-set`, or map a benchmark's columns with --columns")
    return dataset


# ----- scoring one item -----

def score_item(item: dict, answer: str) -> dict[str, Any]:
    category = item["category"]
    choices, check = item.get("choices"), item.get("check")
    choices = json.loads(choices) if isinstance(choices, str) else choices  # our sets store JSON text
    check = json.loads(check) if isinstance(check, str) else check
    if check is not None:
        result = check_format(answer, check)
    elif category == "duration":
        result = score_number(answer, float(item["answer"]))
    elif category == "transcription":
        result = score_transcript(answer, item["answer"])
    elif choices:
        result = score_label(answer, item["answer"], choices, category if category in CLOSED else None)
    elif item.get("answer"):
        result = score_transcript(answer, item["answer"])  # free-form gold: closeness in words
    else:
        return {"score": None, "reason": "needs a judge"}
    return {"score": result.value, "reason": result.reason}


def judge(backend: Backend, items: list[dict], answers: list[str]) -> list[dict[str, Any]]:
    prompts = [[{"role": "user", "content": JUDGE_PROMPT.format(description=i["description"],
                                                                instruction=i["instruction"], answer=a)}]
               for i, a in zip(items, answers, strict=True)]
    verdicts = backend.generate(prompts, SamplingSettings(max_new_tokens=4))
    return [{"score": float(v.text.strip().upper().startswith("YES")), "reason": f"judge: {v.text.strip()[:10]}"}
            for v in verdicts]


# ----- running systems -----

@torch.no_grad()
def speech_answers(model, processor, items: list[dict], batch_size: int, max_new_tokens: int,
                   use_gold_transcripts: bool = False, progress: bool = True) -> tuple[list[str], float]:
    """The speech model's answers from the audio (Whisper transcribes first unless gold is asked)."""
    from desta.audio import load_audio_ref

    answers: list[str] = []
    order = list(range(len(items)))
    started = time.perf_counter()
    for start in tqdm(range(0, len(order), batch_size), desc="speech model", disable=not progress):
        batch = [items[i] for i in order[start : start + batch_size]]
        clips = [load_audio_ref(i["audio"], name=i["item_id"]) for i in batch]
        conversations = [processor.conversation(i["instruction"]) for i in batch]
        transcripts = [[i.get("transcript")] for i in batch] if use_gold_transcripts else None
        answers += model.chat(processor, conversations, [[c] for c in clips], transcripts=transcripts,
                              max_new_tokens=max_new_tokens, do_sample=False)
    return answers, time.perf_counter() - started


def text_answers(backend: TransformersBackend, items: list[dict], max_new_tokens: int,
                 system_prompt: str | None) -> tuple[list[str], float]:
    """The text reference: the same LLM reading the gold description instead of hearing the audio."""
    started = time.perf_counter()
    generations = backend.generate([text_turn(i["description"], i["instruction"], system_prompt) for i in items],
                                   SamplingSettings(max_new_tokens=max_new_tokens))
    return [g.text for g in generations], time.perf_counter() - started


def category_table(items: list[dict], scores: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """Mean score per category and system; forgetting = (speech - text) / text for each speech system."""
    table: dict[str, dict[str, float | None]] = {}
    for category in sorted({i["category"] for i in items}):
        row: dict[str, float | None] = {}
        for system, results in scores.items():
            values = [r["score"] for i, r in zip(items, results, strict=True)
                      if i["category"] == category and r["score"] is not None]
            row[system] = sum(values) / len(values) if values else None
        text = row.get("text")
        for system in scores:
            if system != "text":
                speech = row[system]
                row[f"forgetting:{system}"] = (None if speech is None or not text
                                               else (speech - text) / text)
        table[category] = row
    return table


@dataclass
class EvalConfig:
    """Score checkpoints on unseen speech instructions against the text LLM reading the gold description."""

    POSITIONAL = ("checkpoints",)
    checkpoints: list[str]
    """DeSTA checkpoint folders, compared side by side"""
    eval_set: str
    """folder from `desta eval-set` (or a benchmark with columns)"""
    out: str
    """report folder"""
    columns: dict[str, str] = field(default_factory=dict)
    """our column -> the benchmark's column, e.g. instruction=question"""
    batch_size: int = 8
    """items per generate call"""
    max_new_tokens: int = 96
    """answer length limit"""
    system_prompt: str | None = None
    """null: the system prompt each checkpoint was trained with; "": none"""
    gold_transcripts: bool = False
    """give the speech model the gold transcript instead of Whisper's"""
    judge_model: str | None = None
    """LLM judge for open questions (Hub id/folder, or the served name)"""
    judge_backend: Literal["transformers", "vllm", "http"] = "transformers"
    """where the judge runs"""
    judge_base_url: str | None = None
    """http judge: the server, e.g. http://127.0.0.1:8000/v1"""
    limit: int | None = None
    """evaluate the first N items only"""
    probes: bool = True
    """also run the text retention probes on each model's LLM"""
    probe_max_new_tokens: int = 96
    """answer length limit for the probes"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoints:
            problems.append(("checkpoints", "give at least one checkpoint folder"))
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.probe_max_new_tokens < 1:
            problems.append(("batch_size", "batch_size, max_new_tokens and probe_max_new_tokens must be at least 1"))
        if self.limit is not None and self.limit < 1:
            problems.append(("limit", f"must be at least 1 (or null: every item), got {self.limit}"))
        if self.judge_backend == "http" and self.judge_model and not self.judge_base_url:
            problems.append(("judge_base_url", "the http judge needs judge_base_url"))
        raise_problems(problems)


def system_names(checkpoints: list[str]) -> list[str]:
    """Report names of the speech systems: "speech" for one checkpoint, else their folder names made unique.

    >>> system_names(["runs/a/train"]), system_names(["x/train", "y/train", "z/lora"])
    (['speech'], ['train', 'train-2', 'lora'])
    """
    if len(checkpoints) == 1:
        return ["speech"]
    names: list[str] = []
    for path in checkpoints:
        name, k = Path(path).name or "checkpoint", 1
        while name in names or name == "text":
            k += 1
            name = f"{Path(path).name}-{k}"
        names.append(name)
    return names


def evaluate(config: EvalConfig) -> dict[str, Any]:
    from desta.loading import load
    from desta.posttrain.probes import retention_probes

    dataset = load_eval_set(config.eval_set, config.columns or None)
    if config.limit:
        dataset = dataset.select(range(min(config.limit, len(dataset))))
    items = [dict(row) for row in dataset]
    if not items:
        raise ValueError(f"{config.eval_set} holds no items")
    for path in config.checkpoints:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {path} not found; give a folder written by desta train or export")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    answers: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    probes: dict[str, Any] = {}
    text_llm = None
    for name, path in zip(system_names(config.checkpoints), config.checkpoints, strict=True):
        model, processor = load(path)
        model.eval()
        if config.system_prompt is not None:
            processor.system_prompt = config.system_prompt or None
        answers[name], timing[name] = speech_answers(model, processor, items, config.batch_size,
                                                     config.max_new_tokens, config.gold_transcripts, config.progress)
        backend = TransformersBackend(llm=model.llm, tokenizer=processor.tokenizer, batch_size=config.batch_size)
        if text_llm is None:
            text_llm = model.config.llm_name_or_path
            # the reference is the base LLM: LoRA adapters, if any, are switched off for it
            with model.llm.disable_adapter() if model.config.lora else contextlib.nullcontext():
                answers["text"], timing["text"] = text_answers(backend, items, config.max_new_tokens,
                                                               processor.system_prompt)
        elif model.config.llm_name_or_path != text_llm:
            raise ValueError(f"{path} is built on {model.config.llm_name_or_path}, not {text_llm}; compare "
                             "checkpoints of the same LLM in one report")
        if config.probes:
            probes[name] = retention_probes(backend, max_new_tokens=config.probe_max_new_tokens)
        del model, backend
    scores = {system: [score_item(i, a) for i, a in zip(items, system_answers, strict=True)]
              for system, system_answers in answers.items()}
    judge_id = None
    if config.judge_model:
        from desta.core.generation import make_backend

        kwargs = {"base_url": config.judge_base_url} if config.judge_backend == "http" else {}
        judge_backend = make_backend(config.judge_backend, config.judge_model, **kwargs)
        judge_id = judge_backend.model_id
        open_items = [k for k, i in enumerate(items) if scores["text"][k]["score"] is None]
        for system, system_answers in answers.items():
            verdicts = judge(judge_backend, [items[k] for k in open_items], [system_answers[k] for k in open_items])
            for k, verdict in zip(open_items, verdicts, strict=True):
                scores[system][k] = verdict
    table = category_table(items, scores)
    report = {
        "eval_set": str(config.eval_set), "items": len(items), "checkpoints": config.checkpoints,
        "systems": [s for s in answers if s != "text"],
        "text_reference_llm": text_llm, "judge": judge_id,
        "items_per_second": {s: round(len(items) / t, 3) for s, t in timing.items()},
        "categories": table, "overall": _overall(table, list(answers)),
        "retention_probes": {k: {m: v for m, v in p.items() if m != "items"} for k, p in probes.items()},
        "per_item": [{"item_id": i["item_id"], "category": i["category"], "instruction": i["instruction"],
                      "gold": i.get("answer"), **{f"{s}_answer": answers[s][k] for s in answers},
                      **{f"{s}_score": scores[s][k]["score"] for s in answers},
                      **{f"{s}_reason": scores[s][k]["reason"] for s in answers}} for k, i in enumerate(items)],
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(render_markdown(report))
    plot_scores(table, [s for s in answers], out / SCORES_PLOT)
    return report


def _overall(table: dict, systems: list[str]) -> dict[str, float | None]:
    overall: dict[str, float | None] = {}
    for system in systems:
        values = [row[system] for row in table.values() if row.get(system) is not None]
        overall[system] = sum(values) / len(values) if values else None
    text = overall.get("text")
    for system in systems:
        if system != "text":
            overall[f"forgetting:{system}"] = (None if overall[system] is None or not text
                                               else (overall[system] - text) / text)
    return overall


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.1%}" if percent else f"{value:.3f}"


def render_markdown(report: dict) -> str:
    systems = [s for s in report["overall"] if not s.startswith("forgetting:")]
    speech = [s for s in systems if s != "text"]
    head = ["category", *[f"speech {s}" for s in speech], "text reference", *[f"forgetting {s}" for s in speech]]
    lines = [f"# desta eval: {report['items']} items", "",
             f"Text reference: the same LLM ({report['text_reference_llm']}) reading the gold description. "
             "Forgetting = (speech - text) / text; 0 means nothing lost." + (
                 f" Judge: {report['judge']}." if report["judge"] else " No judge: open questions unscored."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for category, row in list(report["categories"].items()) + [("**overall**", report["overall"])]:
        cells = [category, *[_fmt(row.get(s)) for s in speech], _fmt(row.get("text")),
                 *[_fmt(row.get(f"forgetting:{s}"), percent=True) for s in speech]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Items per second: " + ", ".join(f"{s} {v}" for s, v in report["items_per_second"].items())]
    if report["retention_probes"]:
        lines += ["", "## Text retention probes (the LLM without audio)", "",
                  "| model | format following | JSON validity | refusal (harmful) | over-refusal | held-out log-lik |",
                  "|---|---|---|---|---|---|"]
        for name, p in report["retention_probes"].items():
            lines.append(f"| {name} | {p['format_following']:.2f} | {p['json_validity']:.2f} | "
                         f"{p['refusal_rate']:.2f} | {p['over_refusal_rate']:.2f} | {p['heldout_loglik']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_scores(table: dict, systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(table)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(categories) + 2), 4.2))
    for k, system in enumerate(systems):
        values = [table[c].get(system) or 0.0 for c in categories]
        label = "text reference (gold description)" if system == "text" else f"speech: {system}"
        ax.bar(np.arange(len(categories)) + k * width, values, width, label=label)
    ax.set_xticks(np.arange(len(categories)) + width * (len(systems) - 1) / 2, categories, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (1 = right)")
    ax.set_title("desta eval: speech model vs text reference")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
