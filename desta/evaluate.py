"""Stage 4, eval: unseen speech instructions, scored for the speech model and two text references.

`build_eval_set` turns a described dataset (gold attributes) into items: questions per attribute
(one of at least six phrasings drawn per item: one word, a choice from a list, yes/no, free form,
a sentence), duration, transcription, instruction following (a question plus one IFEval format
instruction) and open questions; no instruction is ever in a training pool. `evaluate` runs each
checkpoint and two references made of the same LLM reading a description instead of hearing the
clip: with the gold transcript ("text"), and with the transcript the speech model itself receives
from its Whisper ("text_asr"). The gap between the references is what ASR costs; the gap between
the speech model and "text_asr" is what the connector costs. Every figure carries a bootstrap 95 %
interval (items resampled within each category, paired across systems).
Writes OUT/report.json, OUT/report.md and OUT/scores.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from desta.core.args import raise_problems
from desta.core.artifacts import CONFIG, PROCESSOR_CONFIG, REPORT_JSON, REPORT_MD, SCORES_PLOT, WEIGHTS, shown_model
from desta.core.generation import Backend, SamplingSettings, TransformersBackend
from desta.core.instructions import INSTRUCTION_KINDS, draw_instruction, follows, instruction_text
from desta.core.stats import bootstrap_table
from desta.prompts import EVAL_INSTRUCTIONS, text_turn
from desta.scoring import (
    first_number,
    named_labels,
    rouge_l,
    score_label,
    score_number,
    score_transcript,
    score_yesno,
    word_error_rate,
    yes_or_no,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from desta.modeling import DestaModel
    from desta.processing import DestaProcessor

CLOSED = ("gender", "accent", "emotion", "speaking_speed", "pitch", "volume")
ITEM_COLUMNS = ["item_id", "id", "category", "instruction", "answer", "choices", "check", "description", "transcript"]
JUDGE_PROMPT = ("You are grading an answer about an audio clip. The clip's description is:\n{description}\n\n"
                "Question: {instruction}\nAnswer: {answer}\n\nIs the answer accurate and relevant to the clip? "
                "Reply with YES or NO only.")
TEXT, TEXT_ASR = "text", "text_asr"  # the references: gold transcript, and the speech model's own Whisper transcript

# Column mappings for public benchmarks saved as `datasets` folders (`desta eval --columns ...`).
BENCHMARK_COLUMNS = {
    "dynamic-superb": {"audio": "audio", "instruction": "instruction", "answer": "label"},
    "mmau": {"audio": "audio", "instruction": "question", "answer": "answer", "choices": "choices"},
    "air-bench": {"audio": "audio", "instruction": "question", "answer": "answer_gt", "choices": "choices"},
}


# ----- building the eval set -----

def build_eval_set(described: Dataset, seed: int = 0, categories: list[str] | None = None,
                   if_items_per_clip: int = 2) -> list[dict[str, Any]]:
    """Eval items from a described dataset: per clip, one item per category its gold data supports
    (and `if_items_per_clip` instruction-following items), each phrasing drawn per item from `seed`."""
    wanted = categories or list(EVAL_INSTRUCTIONS)
    unknown = sorted(set(wanted) - set(EVAL_INSTRUCTIONS))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {sorted(EVAL_INSTRUCTIONS)}")
    columns = described.column_names
    label_sets = {a: sorted({v for v in described[a] if v}) for a in CLOSED if a in columns}
    items = []
    for index, row in enumerate(described):
        for category in wanted:
            count = if_items_per_clip if category == "instruction_following" else 1
            rng = np.random.default_rng([seed, index, list(EVAL_INSTRUCTIONS).index(category)])
            kinds: list[str] = []
            for k in range(count):
                item = _item(row, category, label_sets, rng, kinds)
                if item is None:
                    break
                suffix = f":{k}" if count > 1 else ""
                item.update(item_id=f"{row['id']}:{category}{suffix}", id=row["id"], category=category,
                            description=row["description"], transcript=row.get("transcript"), audio=row["audio"])
                items.append(item)
    return items


def _item(row: dict, category: str, label_sets: dict[str, list[str]], rng: np.random.Generator,
          used_kinds: list[str]) -> dict | None:
    """One item of a category for a clip, or None when its gold data cannot support one."""
    template = str(rng.choice(EVAL_INSTRUCTIONS[category]))
    if category in CLOSED:
        labels = label_sets.get(category, [])
        if not row.get(category) or len(labels) < 2:
            return None  # no gold label, or nothing to tell apart
        if "{candidate}" in template:
            others = [x for x in labels if x != row[category]]
            candidate = row[category] if rng.random() < 0.5 else str(rng.choice(others))
            said = candidate if category == "accent" else candidate.lower()
            return {"instruction": template.format(candidate=said), "answer": "yes" if candidate == row[category]
                    else "no", "choices": None, "check": {"style": "yesno", "candidate": candidate}}
        return {"instruction": template.format(labels=", ".join(labels)), "answer": row[category], "choices": labels,
                "check": {"style": "label"}}
    if category == "duration":
        return {"instruction": template, "answer": f"{row['duration']:.2f}", "choices": None,
                "check": {"style": "number"}}
    if category == "transcription":
        if not row.get("transcript"):
            return None
        return {"instruction": template, "answer": row["transcript"], "choices": None, "check": {"style": "transcript"}}
    if category == "instruction_following":
        free = [k for k in INSTRUCTION_KINDS if k not in used_kinds]
        spec = draw_instruction(rng, template, free)
        used_kinds.append(spec["id"])
        return {"instruction": f"{template}\n{instruction_text(spec)}", "answer": None, "choices": None,
                "check": {"style": "ifeval", "instruction": spec}}
    return {"instruction": template, "answer": None, "choices": None, "check": {"style": "open"}}


def save_eval_set(items: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    """Write items as a `datasets` folder (audio undecoded; choices and checks as JSON text)."""
    from datasets import Audio, Dataset

    table = {name: [item.get(name) for item in items] for name in ITEM_COLUMNS}
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
    """subset of the categories (gender, accent, ..., instruction_following, open); null: all"""
    max_clips: int | None = None
    """use at most this many clips (the first by id)"""
    if_items_per_clip: int = 2
    """instruction-following items per clip, each with a different IFEval instruction kind"""
    seed: int = 0
    """the phrasings, candidates and instructions drawn depend only on it"""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.categories or []) - set(EVAL_INSTRUCTIONS))
        problems = [("categories", f"unknown {unknown}; choose from {sorted(EVAL_INSTRUCTIONS)}")] if unknown else []
        if self.max_clips is not None and self.max_clips < 1:
            problems.append(("max_clips", f"must be at least 1, got {self.max_clips}"))
        if self.if_items_per_clip < 1:
            problems.append(("if_items_per_clip", f"must be at least 1, got {self.if_items_per_clip}"))
        raise_problems(problems)


def write_eval_set(config: EvalSetConfig) -> dict[str, int]:
    """Build and save the eval set; returns the item count per category."""
    from datasets import load_from_disk

    if not Path(config.source).is_dir():
        raise FileNotFoundError(f"{config.source} not found; give the dataset folder written by desta describe")
    described = load_from_disk(config.source)
    items = build_eval_set(described, seed=config.seed, categories=config.categories,
                           if_items_per_clip=config.if_items_per_clip)  # label sets from every clip
    if config.max_clips:
        keep = set(sorted(set(described["id"]))[: config.max_clips])
        items = [i for i in items if i["id"] in keep]
    save_eval_set(items, config.out)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    return counts


def load_eval_set(path: str | os.PathLike, columns: dict[str, str] | None = None) -> Dataset:
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

def _parsed(item: dict, key: str) -> Any:
    value = item.get(key)
    return json.loads(value) if isinstance(value, str) else value  # our sets store JSON text


def score_item(item: dict, answer: str) -> dict[str, Any]:
    """{"score": 0..1 or None (needs a judge), "reason"} for one answer."""
    category, choices, check = item["category"], _parsed(item, "choices"), _parsed(item, "check") or {}
    style = check.get("style")
    if style == "ifeval":
        result = follows(answer, check["instruction"])
    elif style == "yesno":
        result = score_yesno(answer, item["answer"])
    elif style == "number" or category == "duration":
        result = score_number(answer, float(item["answer"]))
    elif style == "transcript" or category == "transcription":
        result = score_transcript(answer, item["answer"])
    elif choices:
        result = score_label(answer, item["answer"], choices, category if category in CLOSED else None)
    elif style != "open" and item.get("answer"):
        result = score_transcript(answer, item["answer"])  # free-form gold: closeness in words
    else:
        return {"score": None, "reason": "needs a judge"}
    return {"score": result.value, "reason": result.reason}


def decision(item: dict, answer: str) -> str | None:
    """What a closed answer decides (the one label named, yes/no, whole seconds), or None when it decides
    nothing or the item is not closed; two systems agree when their decisions are the same."""
    category, choices, check = item["category"], _parsed(item, "choices"), _parsed(item, "check") or {}
    if check.get("style") == "yesno":
        return yes_or_no(answer)
    if check.get("style") == "number" or category == "duration":
        number = first_number(answer)
        return None if number is None else str(round(number))
    if choices:
        named = named_labels(answer, choices, category if category in CLOSED else None)
        return named.pop() if len(named) == 1 else None
    return None


def agreement(item: dict, answer: str, reference: str) -> tuple[float | None, float]:
    """(same decision as the reference, or None for items without one; ROUGE-L F of the two answers)."""
    same = None
    if (_parsed(item, "check") or {}).get("style") in ("yesno", "label", "number") or _parsed(item, "choices"):
        mine, theirs = decision(item, answer), decision(item, reference)
        same = float(mine is not None and mine == theirs)
    return same, rouge_l(reference, answer)


def judge(backend: Backend, items: list[dict], answers: list[str]) -> list[dict[str, Any]]:
    """YES/NO verdicts of an LLM judge on open answers, given the clip's gold description."""
    prompts = [[{"role": "user", "content": JUDGE_PROMPT.format(description=i["description"],
                                                                instruction=i["instruction"], answer=a)}]
               for i, a in zip(items, answers, strict=True)]
    verdicts = backend.generate(prompts, SamplingSettings(max_new_tokens=4))
    return [{"score": float(v.text.strip().upper().startswith("YES")), "reason": f"judge: {v.text.strip()[:10]}"}
            for v in verdicts]


# ----- the references' descriptions -----

_LINE = re.compile(r"^(\[(\d\d:\d\d)-(\d\d:\d\d)\]) (.*?)(?: \(([^()]*)\))?$")


def with_transcript(description: str, transcript: str) -> str:
    """The description with its transcript replaced (one segment spanning the clip; attributes kept).

    >>> with_transcript("[00:00-00:03] Hello there. (Gender: Male, Duration: 3s)", "hello the air")
    '[00:00-00:03] hello the air (Gender: Male, Duration: 3s)'
    """
    lines = [_LINE.match(line) for line in description.strip().splitlines()]
    if not lines or not all(lines):
        raise ValueError(f"cannot find the transcript in description {description[:80]!r}; expected lines like "
                         "'[00:00-00:02] text (Attribute: value, ...)' as desta describe writes them")
    start, end, brackets = lines[0].group(2), lines[-1].group(3), lines[0].group(5)
    return f"[{start}-{end}] {transcript.strip()}" + (f" ({brackets})" if brackets else "")


# ----- running systems -----

class AnswerCache:
    """Answers stored under a key of everything they depend on, so a rerun (after an interruption, or for
    another checkpoint on the same items) computes each only once. No folder: nothing is kept."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: dict[str, Any], compute: Callable[..., Any], *args: Any) -> Any:
        """The stored value for `key`, else `compute(*args)`, stored."""
        if self.folder is None:
            return compute(*args)
        path = self.folder / f"{fingerprint(key)}.json"
        if path.is_file():
            return json.loads(path.read_text())["value"]
        value = compute(*args)
        from desta.core.chunks import write_atomic

        write_atomic(path, json.dumps({"key": key, "value": value}))
        return value


def fingerprint(value: Any) -> str:
    """A short content hash of a JSON-able value (files by their bytes, via `file_digest`)."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_digest(folder: Path, names: tuple[str, ...]) -> str:
    """A content hash of the named files of a folder (those that exist)."""
    import hashlib

    digest = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            digest.update(name.encode())
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def clip_transcripts(model: DestaModel, processor: DestaProcessor, items: list[dict], batch_size: int,
                     progress: bool) -> dict[str, str]:
    """Whisper's transcript of every distinct clip, as the speech model receives it."""
    from desta.audio import load_audio_ref

    first = {}
    for item in items:
        first.setdefault(item["id"], item)
    ids = list(first)
    out: dict[str, str] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="whisper transcripts", disable=not progress):
        batch = ids[start : start + batch_size]
        texts = model.transcribe(processor, [load_audio_ref(first[i]["audio"], name=i) for i in batch])
        out.update(zip(batch, texts, strict=True))
    return out


@torch.no_grad()
def speech_answers(model: DestaModel, processor: DestaProcessor, items: list[dict], transcripts: dict[str, str],
                   batch_size: int,
                   max_new_tokens: int, progress: bool = True) -> tuple[list[str], float]:
    """The speech model's answers from the audio and the given transcript of each clip; and the seconds taken."""
    from desta.audio import load_audio_ref

    answers: list[str] = []
    started = time.perf_counter()
    for start in tqdm(range(0, len(items), batch_size), desc="speech model", disable=not progress):
        batch = items[start : start + batch_size]
        clips = [[load_audio_ref(i["audio"], name=i["item_id"])] for i in batch]
        answers += model.chat(processor, [processor.conversation(i["instruction"]) for i in batch], clips,
                              transcripts=[[transcripts[i["id"]]] for i in batch], max_new_tokens=max_new_tokens,
                              do_sample=False)
    return answers, time.perf_counter() - started


def text_answers(backend: TransformersBackend, items: list[dict], descriptions: list[str], max_new_tokens: int,
                 system_prompt: str | None, progress: bool = False) -> tuple[list[str], float]:
    """A text reference: the same LLM reading a description instead of hearing the audio."""
    conversations = [text_turn(d, i["instruction"], system_prompt) for i, d in zip(items, descriptions, strict=True)]
    return generate_with_progress(backend, conversations, max_new_tokens, "text reference", progress)


def generate_with_progress(backend: TransformersBackend, conversations: list[list[dict]], max_new_tokens: int,
                           what: str, progress: bool) -> tuple[list[str], float]:
    """Greedy answers to the conversations, a few batches at a time under a progress bar; and the seconds taken."""
    started = time.perf_counter()
    step = backend.batch_size * 4  # enough rows per call for length-sorted batches, few enough for the bar to move
    answers: list[str] = []
    for start in tqdm(range(0, len(conversations), step), desc=what, unit="batch", disable=not progress):
        answers += [g.text for g in backend.generate(conversations[start : start + step],
                                                     SamplingSettings(max_new_tokens=max_new_tokens))]
    return answers, time.perf_counter() - started


@dataclass
class EvalConfig:
    """Score checkpoints on unseen speech instructions against the same LLM reading the description."""

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
    """give the speech model the gold transcript instead of Whisper's (then text_asr equals text)"""
    asr_reference: bool = True
    """also run the text reference that reads Whisper's transcript (tells ASR loss from connector loss)"""
    judge_model: str | None = None
    """LLM judge for open questions (Hub id/folder, or the served name)"""
    judge_backend: Literal["transformers", "vllm", "http"] = "transformers"
    """where the judge runs"""
    judge_base_url: str | None = None
    """http judge: the server, e.g. http://127.0.0.1:8000/v1"""
    limit: int | None = None
    """evaluate the first N items only (with benchmark: the first N of each subset)"""
    benchmark: str | None = None
    """score a public benchmark as its authors do (speech-ifeval, voicebench, air-bench, mmau); eval_set is then
    its folder or Hub id, in the layout its authors publish"""
    subsets: list[str] | None = None
    """with benchmark: the parts to run, e.g. mmsu,ifeval or sd-qa/usa (VoiceBench), closed_ended (Speech-IFEval),
    a task (AIR-Bench, MMAU); null: all"""
    probes: bool = True
    """also run the text retention probes on each model's LLM"""
    probe_max_new_tokens: int = 96
    """answer length limit for the probes"""
    cache: str | None = None
    """folder of answers already computed (per checkpoint weights, reference LLM, items and settings); an
    interrupted or repeated eval reuses them, e.g. the references across checkpoints of one experiment"""
    resamples: int = 2000
    """bootstrap resamples for the 95 % intervals"""
    seed: int = 0
    """bootstrap seed"""
    progress: bool = True
    """show progress bars"""

    def __post_init__(self) -> None:
        problems = []
        if not self.checkpoints:
            problems.append(("checkpoints", "give at least one checkpoint folder"))
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.probe_max_new_tokens < 1 or self.resamples < 100:
            problems.append(("batch_size", "batch_size, max_new_tokens and probe_max_new_tokens must be at least 1, "
                                           "resamples at least 100"))
        if self.limit is not None and self.limit < 1:
            problems.append(("limit", f"must be at least 1 (or null: every item), got {self.limit}"))
        if self.judge_backend == "http" and self.judge_model and not self.judge_base_url:
            problems.append(("judge_base_url", "the http judge needs judge_base_url"))
        from desta.benchmarks import BENCHMARKS

        if self.benchmark is not None and self.benchmark not in BENCHMARKS:
            problems.append(("benchmark", f"unknown {self.benchmark!r}; choose from {sorted(BENCHMARKS)}"))
        if self.subsets and not self.benchmark:
            problems.append(("subsets", "subsets choose parts of a benchmark: give benchmark too"))
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
        while name in names or name in (TEXT, TEXT_ASR):
            k += 1
            name = f"{Path(path).name}-{k}"
        names.append(name)
    return names


def _speech_system(path: str, config: EvalConfig, text_llm: str | None, items_key: str,
                   system_prompt: str | None = None) -> tuple[DestaModel, DestaProcessor, str, dict[str, Any]]:
    """One checkpoint loaded for evaluation, asked with the system prompt it was trained with unless the config
    (or else `system_prompt`) gives one; a checkpoint on another LLM than `text_llm` is refused. Returns the
    model, its processor, the digest of its weights and the settings its cached answers are keyed by."""
    from desta.loading import load

    model, processor = load(path)
    model.eval()
    if config.system_prompt is not None:
        processor.system_prompt = config.system_prompt or None
    elif system_prompt:
        processor.system_prompt = system_prompt
    if text_llm is not None and model.config.llm_name_or_path != text_llm:
        raise ValueError(f"{path} is built on {model.config.llm_name_or_path}, not {text_llm}; compare "
                         "checkpoints of the same LLM in one report")
    weights = file_digest(Path(path), (WEIGHTS, CONFIG, PROCESSOR_CONFIG))
    settings = {"items": items_key, "max_new_tokens": config.max_new_tokens, "system_prompt": processor.system_prompt}
    return model, processor, weights, settings


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run every checkpoint and the references on the eval set; write and return the report."""
    from desta.posttrain.probes import retention_probes

    if config.benchmark:
        return evaluate_benchmark(config)
    dataset = load_eval_set(config.eval_set, config.columns or None)
    if config.limit:
        dataset = dataset.select(range(min(config.limit, len(dataset))))
    items = [dict(row) for row in dataset]
    if not items:
        raise ValueError(f"{config.eval_set} holds no items")
    for path in config.checkpoints:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {path} not found; give a folder written by desta train or export")
    has_descriptions = all(i.get("description") for i in items)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = AnswerCache(config.cache)
    items_key = fingerprint([[i["item_id"], i["instruction"], i.get("description"), _audio_key(i["audio"])]
                             for i in items])
    answers: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    probes: dict[str, Any] = {}
    asr_of: dict[str, str] = {}  # speech system -> its Whisper-transcript reference
    whisper_wer: dict[str, float] = {}
    text_llm, encoders = None, {}
    speech = system_names(config.checkpoints)
    for name, path in zip(speech, config.checkpoints, strict=True):
        model, processor, weights, settings = _speech_system(path, config, text_llm, items_key)
        text_llm = model.config.llm_name_or_path
        if config.gold_transcripts:
            transcripts = {i["id"]: i.get("transcript") or "" for i in items}
        else:  # the same Whisper gives the same transcripts
            encoder = model.config.encoder_name_or_path or weights
            transcripts = cache.get({"kind": "whisper", "encoder": encoder, "items": items_key}, clip_transcripts,
                                    model, processor, items, config.batch_size, config.progress)
        answers[name], timing[name] = cache.get(
            {"kind": "speech", "checkpoint": weights, "transcripts": fingerprint(transcripts), **settings},
            speech_answers, model, processor, items, transcripts, config.batch_size, config.max_new_tokens,
            config.progress)
        backend = TransformersBackend(llm=model.llm, tokenizer=processor.tokenizer, batch_size=config.batch_size)
        # the references are the base LLM: LoRA adapters, if any, are switched off for them
        with model.llm.disable_adapter() if model.config.lora else contextlib.nullcontext():
            reference = {"kind": "text", "llm": text_llm, **settings}
            if has_descriptions and TEXT not in answers:
                descriptions = [i["description"] for i in items]
                answers[TEXT], timing[TEXT] = cache.get({**reference, "descriptions": fingerprint(descriptions)},
                                                        text_answers, backend, items, descriptions,
                                                        config.max_new_tokens, processor.system_prompt,
                                                        config.progress)
            if has_descriptions and config.asr_reference and not config.gold_transcripts:
                if encoder not in encoders:
                    encoders[encoder] = TEXT_ASR if not encoders else f"{TEXT_ASR}:{name}"
                    described = [with_transcript(i["description"], transcripts[i["id"]]) for i in items]
                    answers[encoders[encoder]], timing[encoders[encoder]] = cache.get(
                        {**reference, "descriptions": fingerprint(described)}, text_answers, backend, items,
                        described, config.max_new_tokens, processor.system_prompt, config.progress)
                asr_of[name] = encoders[encoder]
        gold = {i["id"]: i.get("transcript") for i in items if i.get("transcript")}
        if gold and not config.gold_transcripts:
            whisper_wer[name] = float(np.mean([word_error_rate(g, transcripts[c]) for c, g in gold.items()]))
        if config.probes:
            # without LoRA the checkpoint's LLM is the frozen base: its probes are the base's, computed once
            llm_weights = weights if model.config.lora is not None else None
            probes[name] = cache.get({"kind": "probes", "checkpoint": llm_weights, "llm": text_llm,
                                      "max_new_tokens": config.probe_max_new_tokens}, retention_probes, backend,
                                     config.probe_max_new_tokens)
        del model, backend
    scores = {system: [score_item(i, a) for i, a in zip(items, system_answers, strict=True)]
              for system, system_answers in answers.items()}
    judge_id = _judge_open_items(config, items, answers, scores)
    report = _report(config, items, answers, scores, speech, asr_of, whisper_wer, timing, probes, text_llm, judge_id)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(render_markdown(report))
    plot_scores(report, out / SCORES_PLOT)
    return report


def _audio_key(audio: dict) -> str:
    """What identifies a clip's audio: its path and size, or a hash of its bytes."""
    if audio.get("bytes"):
        import hashlib

        return hashlib.sha256(audio["bytes"]).hexdigest()[:24]
    path = Path(audio.get("path") or "")
    return f"{path}:{path.stat().st_size if path.is_file() else 'missing'}"


def _judge_open_items(config: EvalConfig, items: list[dict], answers: dict[str, list[str]],
                      scores: dict[str, list[dict]]) -> str | None:
    """Score the items that need a judge, when one is configured; returns the judge's id."""
    if not config.judge_model:
        return None
    from desta.core.generation import make_backend

    kwargs = {"base_url": config.judge_base_url} if config.judge_backend == "http" else {}
    backend = make_backend(config.judge_backend, config.judge_model, **kwargs)
    open_items = [k for k, i in enumerate(items) if score_item(i, "")["score"] is None]
    for system, system_answers in answers.items():
        verdicts = judge(backend, [items[k] for k in open_items], [system_answers[k] for k in open_items])
        for k, verdict in zip(open_items, verdicts, strict=True):
            scores[system][k] = verdict
    return backend.model_id


# ----- public benchmarks, scored as their authors score them -----

def evaluate_benchmark(config: EvalConfig) -> dict[str, Any]:
    """`desta eval --benchmark NAME`: every checkpoint on the benchmark's items, and, where the benchmark has a
    text version of each item, the same LLM reading that text as the reference; scored by the authors' rules.
    Writes the usual report (per subset, bootstrap intervals, forgetting against the text reference), the
    figures as the authors report them, and OUT/rejects.jsonl for items the loader could not use."""
    from desta.benchmarks import BENCHMARKS, load_benchmark, official_scores, score_answer
    from desta.core.chunks import to_jsonl

    benchmark = BENCHMARKS[config.benchmark]
    items, rejects = load_benchmark(config.benchmark, config.eval_set, config.subsets)
    if config.limit:
        taken: dict[str, int] = {}
        for item in items:
            taken[item["category"]] = taken.get(item["category"], 0) + 1
            item["_rank"] = taken[item["category"]]
        items = [i for i in items if i.pop("_rank") <= config.limit]
    if not items:
        raise ValueError(f"{config.eval_set} holds no usable {config.benchmark} items ({len(rejects)} rejected)")
    for path in config.checkpoints:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {path} not found; give a folder written by desta train or export")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rejects.jsonl").write_text(to_jsonl(rejects))
    cache = AnswerCache(config.cache)
    items_key = fingerprint([config.benchmark, [[i["item_id"], i["instruction"], i["text_input"],
                                                 _audio_key(i["audio"])] for i in items]])
    answers: dict[str, list[str]] = {}
    timing: dict[str, float] = {}
    speech, text_llm = system_names(config.checkpoints), None
    for name, path in zip(speech, config.checkpoints, strict=True):
        # items[0]["system"]: the system prompt the benchmark's own runner sends
        model, processor, weights, settings = _speech_system(path, config, text_llm, items_key, items[0]["system"])
        text_llm = model.config.llm_name_or_path
        transcripts = cache.get({"kind": "whisper", "encoder": model.config.encoder_name_or_path or weights,
                                 "items": items_key}, clip_transcripts, model, processor, items, config.batch_size,
                                config.progress)
        answers[name], timing[name] = cache.get(
            {"kind": "speech", "checkpoint": weights, **settings}, speech_answers, model, processor, items,
            transcripts, config.batch_size, config.max_new_tokens, config.progress)
        if benchmark.text_modality and TEXT not in answers:
            backend = TransformersBackend(llm=model.llm, tokenizer=processor.tokenizer, batch_size=config.batch_size)
            turns = [([{"role": "system", "content": processor.system_prompt}] if processor.system_prompt else [])
                     + [{"role": "user", "content": i["text_input"]}] for i in items]
            with model.llm.disable_adapter() if model.config.lora else contextlib.nullcontext():
                answers[TEXT], timing[TEXT] = cache.get({"kind": "benchmark text", "llm": text_llm, **settings},
                                                        generate_with_progress, backend, turns,
                                                        config.max_new_tokens, "text reference", config.progress)
        del model
    scores = {system: [score_answer(i, a, config.seed) for i, a in zip(items, system_answers, strict=True)]
              for system, system_answers in answers.items()}
    judge_id = _judge_benchmark(config, items, answers, scores)
    report = _report(config, items, answers, scores, speech, {}, {}, timing, {}, text_llm, judge_id)
    official = {system: official_scores(config.benchmark, items, results) for system, results in scores.items()}
    for row, item in zip(report["per_item"], items, strict=True):
        if not row["instruction"]:  # VoiceBench: the audio is the whole turn; show what it says
            row["instruction"] = f"(spoken) {item['text_input']}"
    reference = ("the same LLM reading the benchmark's own text of each item (the text-gold column): "
                 + ("Speech-IFEval's cascade input, 'Speech Input: {textual_audio}' and the instruction"
                    if config.benchmark == "speech-ifeval" else "VoiceBench's text modality, the spoken prompt as "
                                                                "text") if benchmark.text_modality else None)
    report.update(
        title=f"# desta eval --benchmark {config.benchmark}: {len(items)} items ({len(rejects)} rejected)",
        intro=(f"Speech model(s) on {config.benchmark} ({benchmark.published}), scored by its authors' rules; "
               + (f"the reference is {reference}; forgetting = (speech - text) / text. " if reference else
                  "the benchmark has no text version of its items, so no text reference. ")
               + f"Per-item scores in [0, 1] per subset; cells: value [{report['interval']}]; ~ marks a difference "
               "whose interval includes 0." + (f" Judge: {judge_id}." if judge_id else
                                              " No judge: judged subsets unscored.")),
        benchmark={"name": config.benchmark, "source": config.eval_set, "subsets": config.subsets,
                   "rejected": len(rejects), "official": official, "reference": reference})
    report["references"] = {TEXT: reference} if reference else {}
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(render_markdown(report) + render_official(report))
    plot_scores(report, out / SCORES_PLOT)
    return report


def _judge_benchmark(config: EvalConfig, items: list[dict], answers: dict[str, list[str]],
                     scores: dict[str, list[dict]]) -> str | None:
    """Scores from the LLM judge for the items whose rule needs one (VoiceBench's open and sd-qa sets: three
    replies sampled at temperature 0.5, as the authors do; Speech-IFEval's chain-of-thought: one greedy reply)."""
    from desta.benchmarks import judge_prompts, judge_samples, judge_verdict

    if not config.judge_model:
        return None
    from desta.core.generation import make_backend

    kwargs = {"base_url": config.judge_base_url} if config.judge_backend == "http" else {}
    backend = make_backend(config.judge_backend, config.judge_model, **kwargs)
    for system, system_answers in answers.items():
        judged = [k for k, i in enumerate(items) if judge_prompts(i, system_answers[k]) is not None]
        if not judged:
            continue
        conversations = [judge_prompts(items[k], system_answers[k]) for k in judged]
        samples = max(judge_samples(items[k]) for k in judged)
        replies = [[g.text for g in backend.generate(conversations, SamplingSettings(
            max_new_tokens=256, temperature=0.5 if samples > 1 else 0.0, top_p=0.95 if samples > 1 else 1.0,
            seed=draw))] for draw in range(samples)]
        for row, k in enumerate(judged):
            scores[system][k] = judge_verdict(items[k], [r[row] for r in replies][: judge_samples(items[k])])
    return backend.model_id


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_official(report: dict) -> str:
    """The benchmark's figures as its authors report them, one column per system, for report.md."""
    bench = report["benchmark"]
    official, systems = bench["official"], list(bench["official"])
    labels = [_label(s) if s == TEXT else s for s in systems]
    lines = ["", f"## {bench['name']} as its authors report it", ""]
    if bench["name"] == "speech-ifeval":
        lines += ["| | " + " | ".join(labels) + " |", "|" + "---|" * (len(systems) + 1)]
        for part in ("closed_ended", "creative_writing", "chain_of_thought"):
            lines.append(f"| {part} (%) | " + " | ".join(_pct(official[s]["rates"].get(part)) for s in systems) + " |")
        lines.append("| **IFrate** (%) | " + " | ".join(_pct(official[s]["if_rate"]) for s in systems) + " |")
        reference = official.get(TEXT, {}).get("if_rate")
        for s in (s for s in systems if s != TEXT and reference is not None):
            delta = f"{(official[s]['if_rate'] - reference) / reference:+.2%}" if reference else \
                "undefined (the text reference follows no instruction)"
            lines.append(f"\nForgetting rate of {s} (Speech-IFEval's Δ = (IFrate - IFrate_text) / IFrate_text): "
                         f"{delta}.")
        parts = official[systems[0]]["if_rate_parts"]
        lines.append(f"\nIFrate is the mean of the parts scored here ({', '.join(parts)}); the published IFrate "
                     "averages closed-ended, creative writing and chain-of-thought (judged by an LLM).")
        kinds = sorted({k for s in systems for k in official[s]["by_instruction"]})
        lines += ["", "| instruction | " + " | ".join(labels) + " |", "|" + "---|" * (len(systems) + 1)]
        lines += [f"| {k} | " + " | ".join(_pct(official[s]["by_instruction"].get(k)) for s in systems) + " |"
                  for k in kinds]
    elif bench["name"] == "voicebench":
        lines += ["| subset | evaluator | n | " + " | ".join(labels) + " |", "|" + "---|" * (len(systems) + 3)]
        for subset, row in official[systems[0]]["subsets"].items():
            cells = []
            for s in systems:
                r = official[s]["subsets"][subset]
                cell = _pct(r["value"]) + (" /5" if r["evaluator"] == "open" and r["value"] is not None else "")
                if "fallback_rate" in r:
                    cell += f" (guessed {r['fallback_rate']:.0f} %)"
                cells.append(cell)
            lines.append(f"| {subset} | {row['evaluator']} | {row['n']} | " + " | ".join(cells) + " |")
        lines.append("| **overall** | | | " + " | ".join(_pct(official[s]["overall"]) for s in systems) + " |")
        lines.append(f"\n{official[systems[0]]['overall_note']}. mcq/bbh: accuracy, an answer naming no option gets "
                     "a seeded random guess as VoiceBench does (share shown); ifeval: mean of strict/loose prompt- "
                     "and instruction-level accuracy; advbench: refusal rate; open: judge rating 1-5.")
    elif bench["name"] == "air-bench":
        lines += ["| task | n | " + " | ".join(f"{s} acc. (failed)" for s in labels) + " |",
                  "|" + "---|" * (len(systems) + 2)]
        for task, row in official[systems[0]]["tasks"].items():
            lines.append(f"| {task} | {row['n']} | " + " | ".join(
                f"{_pct(official[s]['tasks'][task]['accuracy'])} ({official[s]['tasks'][task]['failed']})"
                for s in systems) + " |")
        lines.append("| **macro / micro** | | " + " | ".join(
            f"{_pct(official[s]['macro'])} / {_pct(official[s]['micro'])}" for s in systems) + " |")
        lines.append("\nAccuracy (%) over the answers that start with (or end in) an option letter; the others "
                     "(failed) leave the denominator, as AIR-Bench's scorer does.")
    else:
        lines += ["| | " + " | ".join(labels) + " |", "|" + "---|" * (len(systems) + 1)]
        for group in ("task", "difficulty"):
            for key in official[systems[0]][group]:
                lines.append(f"| {group} {key} | " + " | ".join(_pct(official[s][group][key]) for s in systems)
                             + " |")
        lines.append("| **total** (%) | " + " | ".join(_pct(official[s]["total"]) for s in systems) + " |")
        lines.append("\nMMAU's string match: the answer holds every word of the right choice and no word only a "
                     "wrong choice has.")
    return "\n".join(lines) + "\n"


def _report(config: EvalConfig, items: list[dict], answers: dict[str, list[str]], scores: dict[str, list[dict]],
            speech: list[str], asr_of: dict[str, str], whisper_wer: dict[str, float], timing: dict[str, float],
            probes: dict[str, Any], text_llm: str | None, judge_id: str | None) -> dict[str, Any]:
    series: dict[str, list[float | None]] = {s: [r["score"] for r in results] for s, results in scores.items()}
    ratios: dict[str, tuple[str, str]] = {}
    if TEXT in answers:
        for name in speech:
            pairs = [agreement(i, a, r) for i, a, r in zip(items, answers[name], answers[TEXT], strict=True)]
            series[f"agreement:{name}"] = [p[0] for p in pairs]
            series[f"rouge_l:{name}"] = [p[1] for p in pairs]
            ratios[f"forgetting:{name}"] = (name, TEXT)
            if name in asr_of:
                ratios[f"forgetting_asr:{name}"] = (name, asr_of[name])
        for reference in sorted(set(asr_of.values())):
            ratios[f"asr_cost:{reference}"] = (reference, TEXT)
    categories = [i["category"] for i in items]
    table = bootstrap_table(categories, series, ratios, resamples=config.resamples, seed=config.seed)
    overall = table.pop("overall")
    following = [k for k, i in enumerate(items) if (_parsed(i, "check") or {}).get("style") == "ifeval"]
    kinds = bootstrap_table([_parsed(items[k], "check")["instruction"]["id"] for k in following],
                            {s: [series[s][k] for k in following] for s in answers},
                            resamples=config.resamples, seed=config.seed) if following else {}
    kinds.pop("overall", None)
    return {
        "eval_set": str(config.eval_set), "items": len(items), "checkpoints": config.checkpoints, "systems": speech,
        "references": {TEXT: "the same LLM reading the description with the gold transcript",
                       **{r: "the same LLM reading the description with the speech model's Whisper transcript"
                          for r in sorted(set(asr_of.values()))}},
        "asr_reference_of": asr_of, "whisper_wer": whisper_wer, "text_reference_llm": text_llm, "judge": judge_id,
        "interval": f"bootstrap 95 % ({config.resamples} resamples, seed {config.seed}, items resampled within "
                    "each category, paired across systems)",
        "items_per_second": {s: round(len(items) / t, 3) for s, t in timing.items()},
        "categories": table, "overall": overall, "instruction_following_kinds": kinds,
        "retention_probes": {k: {m: v for m, v in p.items() if m != "items"} for k, p in probes.items()},
        "per_item": [{"item_id": i["item_id"], "category": i["category"], "instruction": i["instruction"],
                      "gold": i.get("answer"), **{f"{s}_answer": answers[s][k] for s in answers},
                      **{f"{s}_score": scores[s][k]["score"] for s in answers},
                      **{f"{s}_reason": scores[s][k]["reason"] for s in answers}} for k, i in enumerate(items)],
    }


# ----- the report -----

def _fmt(value: float | None, ci: list[float] | None = None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{value:+.0%}" if percent else f"{value:.2f}"
    if ci:
        low, high = ci
        text += f" [{low:+.0%}, {high:+.0%}]" if percent else f" [{low:.2f}, {high:.2f}]"
        if percent and low <= 0 <= high:
            text += " ~"
    return text


def format_cell(row: dict, name: str, percent: bool = False) -> str:
    """A table cell: the row's value for `name` with its interval ("0.62 [0.51, 0.73]"); ~ marks a
    difference whose interval includes 0."""
    return _fmt(row["values"].get(name), row["ci"].get(name), percent)


def render_markdown(report: dict) -> str:
    """report.md: the per-category table with intervals, the instruction kinds, examples, the probes."""
    speech = report["systems"]
    asr_of = report.get("asr_reference_of", {})
    references = [r for r in (TEXT_ASR, TEXT) if r in report["overall"]["values"]] + sorted(
        {r for r in asr_of.values() if r != TEXT_ASR})
    head = ["category", "n", *[s if s == "speech" else f"speech {s}" for s in speech], *[_label(r) for r in references]]
    for s in speech:
        head += [f"forgetting vs text-ASR ({s})"] * (s in asr_of) + [f"forgetting vs text-gold ({s})",
                                                                    f"agreement ({s})", f"ROUGE-L ({s})"]
    head += [f"ASR cost ({r})" for r in sorted(set(asr_of.values()))]
    lines = [f"# desta eval: {report['items']} items", "",
             f"Speech model(s) against the same LLM ({shown_model(report['text_reference_llm'])}) reading the clip's "
             "description: with the gold transcript (text-gold) and with the transcript the speech model receives "
             "from its Whisper (text-ASR). Forgetting = (speech - reference) / reference: against text-ASR it is "
             "what the connector loses, the ASR cost (text-ASR - text-gold) / text-gold is what Whisper's mistakes "
             "lose. "
             "Agreement: the same closed answer as text-gold; ROUGE-L: word overlap with text-gold's answer. "
             f"Cells: value [{report['interval']}]; ~ marks a difference whose interval includes 0 (not "
             "distinguishable from noise)." + (f" Judge: {report['judge']}." if report["judge"] else
                                               " No judge: open questions unscored."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if report.get("intro"):  # a benchmark's report: its own title, and what its reference reads
        lines[0], lines[2] = report["title"], report["intro"]
    rows = list(report["categories"].items()) + [("**overall**", report["overall"])]
    for category, row in rows:
        cells = [category, str(row["n"]), *[format_cell(row, s) for s in speech + references]]
        for s in speech:
            if s in asr_of:
                cells.append(format_cell(row, f"forgetting_asr:{s}", True))
            cells += [format_cell(row, f"forgetting:{s}", True), format_cell(row, f"agreement:{s}"),
                      format_cell(row, f"rouge_l:{s}")]
        cells += [format_cell(row, f"asr_cost:{r}", True) for r in sorted(set(asr_of.values()))]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("whisper_wer"):
        lines += ["", "Whisper word error rate on these clips (what the speech model hears as its transcript): "
                  + ", ".join(f"{s} {w:.2f}" for s, w in report["whisper_wer"].items()) + "."]
    lines += ["", "Items per second: " + ", ".join(f"{s} {v}" for s, v in report["items_per_second"].items())]
    if report.get("instruction_following_kinds"):
        systems = speech + references
        lines += ["", "## Instruction following by IFEval instruction (strict)", "",
                  "| instruction | n | " + " | ".join(systems) + " |", "|" + "---|" * (len(systems) + 2)]
        for kind, row in report["instruction_following_kinds"].items():
            lines.append(f"| {kind} | {row['n']} | " + " | ".join(format_cell(row, s) for s in systems) + " |")
    lines += _examples(report, speech + references)
    if report["retention_probes"]:
        lines += ["", "## Text retention probes (the LLM without audio)", "",
                  "| model | format following | JSON validity | refusal (harmful) | over-refusal | held-out log-lik |",
                  "|---|---|---|---|---|---|"]
        for name, p in report["retention_probes"].items():
            lines.append(f"| {name} | {p['format_following']:.2f} | {p['json_validity']:.2f} | "
                         f"{p['refusal_rate']:.2f} | {p['over_refusal_rate']:.2f} | {p['heldout_loglik']:.3f} |")
    return "\n".join(lines) + "\n"


def _label(system: str) -> str:
    return {TEXT: "text-gold", TEXT_ASR: "text-ASR"}.get(system, system.replace(TEXT_ASR, "text-ASR"))


def _examples(report: dict, systems: list[str], per_category: int = 2, width: int = 160) -> list[str]:
    """Two items per category with every system's answer, to read what the scores mean."""
    lines = ["", "## Examples", ""]
    shown: dict[str, int] = {}
    for item in report["per_item"]:
        if shown.get(item["category"], 0) >= per_category:
            continue
        shown[item["category"]] = shown.get(item["category"], 0) + 1
        instruction = item["instruction"].replace("\n", " ")
        gold = "" if item["gold"] is None else f" (gold: {str(item['gold'])[:80]})"
        lines.append(f"- **{item['category']}**: {instruction[:width]}{gold}")
        for system in systems:
            answer = " ".join(str(item[f"{system}_answer"]).split())
            score = item[f"{system}_score"]
            lines.append(f"  - {_label(system)} ({'unscored' if score is None else f'{score:.2f}'}): "
                         f"{answer[:width]}{'...' if len(answer) > width else ''}")
    return lines


def plot_scores(report: dict, path: Path) -> None:
    """Grouped bars per category with 95 % interval whiskers: each speech system and the references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**report["categories"], "overall": report["overall"]}
    systems = report["systems"] + [r for r in (TEXT_ASR, TEXT) if r in report["overall"]["values"]]
    categories = list(rows)
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(categories) + 2), 4.6))
    for k, system in enumerate(systems):
        values = np.array([rows[c]["values"].get(system) or 0.0 for c in categories])
        cis = [rows[c]["ci"].get(system) or [v, v] for c, v in zip(categories, values, strict=True)]
        errors = np.array([[v - lo, hi - v] for v, (lo, hi) in zip(values, cis, strict=True)]).T.clip(min=0)
        label = {TEXT: "text-gold (LLM reads gold description)",
                 TEXT_ASR: "text-ASR (LLM reads description with Whisper transcript)"}.get(system, f"speech: {system}")
        ax.bar(np.arange(len(categories)) + k * width, values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(np.arange(len(categories)) + width * (len(systems) - 1) / 2, categories, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (1 = right), 95 % interval")
    ax.set_title("desta eval: speech model vs text references")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
