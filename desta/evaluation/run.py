"""Stage 4, eval: unseen speech instructions, scored for the speech model and two text references.

`evaluate` runs each checkpoint and the references on the items of an eval set (desta.evaluation.items) or
of a public benchmark (desta.evaluation.benchmarks), in one loop. For an eval set the references are the
same LLM reading a description instead of hearing the clip: with the gold transcript ("text"), and with
the transcript the speech model itself receives from its Whisper ("text_asr"). The gap between the
references is what ASR costs; the gap between the speech model and "text_asr" is what the connector
costs. A benchmark's reference is the same LLM reading the benchmark's own text of each item, where it has
one. Every figure carries a bootstrap 95 % interval (items resampled within each category, paired across
systems). Writes OUT/report.json, OUT/report.md and OUT/scores.png (and OUT/rejects.jsonl for a benchmark).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from desta.core.args import raise_problems
from desta.core.artifacts import REJECTS, REPORT_JSON, REPORT_MD, SCORES_PLOT
from desta.core.cache import AnswerCache
from desta.core.digests import audio_key, fingerprint
from desta.core.generation import GenerationSection
from desta.core.summary import Summary
from desta.describe.description import with_transcript
from desta.evaluation import systems
from desta.evaluation.items import load_eval_set
from desta.evaluation.report import build_report, plot_scores, render_markdown
from desta.evaluation.scoring import judge_prompt, judge_verdict, score_item, word_error_rate
from desta.evaluation.systems import (
    TEACHER,
    TEACHER_ASR,
    TEXT,
    TEXT_ASR,
    TEXT_OWN,
    TEXT_OWN_ASR,
    Judging,
    SpeechSystem,
    SystemsRun,
)
from desta.prompts import with_system


@dataclass
class EvalConfig:
    """Score checkpoints on unseen speech instructions against the same LLM reading the description."""

    POSITIONAL = ("checkpoints",)
    MOVED = {"judge_model": "judge.model", "judge_backend": "judge.kind", "judge_base_url": "judge.base_url"}
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights of the models; bfloat16 halves their memory, and on a CPU with bf16 instructions a large LLM
    answers about twice as fast (the answers of a bf16 model, cached apart from float32's)"""
    gold_transcripts: bool = False
    """give the speech model the gold transcript instead of Whisper's (then text_asr equals text)"""
    asr_reference: bool = True
    """also run the text reference that reads Whisper's transcript (tells ASR loss from connector loss)"""
    judge: GenerationSection = field(default_factory=GenerationSection)
    """the LLM judge of open questions and where it runs, e.g. judge.model=Qwen/Qwen2.5-7B-Instruct (judge.model
    empty: no judge)"""
    limit: int | None = None
    """evaluate the first N items only (with benchmark: the first N of each subset)"""
    benchmark: str | None = None
    """score a public benchmark as its authors do (speech-ifeval, voicebench, air-bench, mmau); eval_set is then
    its folder or Hub id, in the layout its authors publish"""
    subsets: list[str] | None = None
    """with benchmark: the parts to run, e.g. mmsu,ifeval or sd-qa/usa (VoiceBench), closed_ended (Speech-IFEval),
    a task (AIR-Bench, MMAU); null: all"""
    teacher_model: str | None = None
    """the LLM that wrote the targets (Hub id or folder): it reads the descriptions too (what the targets could
    carry); null: not run"""
    trained_tasks: list[str] | None = None
    """eval categories the checkpoints' training prompts asked about (null: read from each checkpoint's
    run_config.yaml targets dataset); the report scores trained and unseen tasks apart"""
    train_voices: str | None = None
    """a dataset folder whose `voice` column lists the voices trained on (null: the checkpoint's targets dataset);
    the report scores seen and unseen voices apart and warns when eval clips speak with training voices"""
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
        from desta.evaluation.benchmarks import BENCHMARKS

        problems = []
        if not self.checkpoints:
            problems.append(("checkpoints", "give at least one checkpoint folder"))
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.probe_max_new_tokens < 1 or self.resamples < 100:
            problems.append(("batch_size", "batch_size, max_new_tokens and probe_max_new_tokens must be at least 1, "
                                           "resamples at least 100"))
        if self.limit is not None and self.limit < 1:
            problems.append(("limit", f"must be at least 1 (or null: every item), got {self.limit}"))
        if self.benchmark is not None and self.benchmark not in BENCHMARKS:
            problems.append(("benchmark", f"unknown {self.benchmark!r}; choose from {sorted(BENCHMARKS)}"))
        if self.subsets and not self.benchmark:
            problems.append(("subsets", "subsets choose parts of a benchmark: give benchmark too"))
        if self.benchmark and self.gold_transcripts:
            problems.append(("gold_transcripts", "benchmarks hold no gold transcripts; leave it false"))
        raise_problems(problems)


# What a task's references do for one speech system: given its name, the loaded system, its LLM as a text
# backend, its Whisper transcripts, the settings its answers are keyed by, the cache and the run so far, add
# the reference answers not yet in the run; returns the name of the system's text-ASR reference, or None.
References = Callable[[str, SpeechSystem, Any, dict[str, str], dict[str, Any], AnswerCache, SystemsRun], str | None]


@dataclass
class Task:
    """What one evaluation runs: the items, what identifies them, the system prompt to ask with (None: each
    checkpoint's own), how an answer is scored and judged, the references, and whether the probes run."""

    items: list[dict]
    key: str
    system_prompt: str | None
    score: Callable[[dict, str], dict[str, Any]]
    judging: Judging
    references: References
    probes: bool
    finish: Callable[[dict[str, Any], dict[str, list[dict]]], None] = lambda report, scores: None
    own_references: References | None = None  # the LLM as trained (LoRA on) reading the description
    teacher_references: Callable[[EvalConfig, AnswerCache, SystemsRun], None] | None = None
    groups: bool = False  # trained vs unseen tasks, seen vs unseen voices


def evaluate(config: EvalConfig) -> Summary:
    """Run every checkpoint and the references on the eval set (or benchmark); write and return the report."""
    task = benchmark_task(config) if config.benchmark else eval_set_task(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run = run_systems(config, task)
    scores = {system: [task.score(i, a) for i, a in zip(task.items, system_answers, strict=True)]
              for system, system_answers in run.answers.items()}
    judge_id = None
    if config.judge.model:
        backend = config.judge.backend()
        systems.judge_scores(backend, task.judging, task.items, run.answers, scores)
        judge_id = backend.model_id
    report = build_report(run, task.items, scores, judge_id, config.eval_set, config.checkpoints, config.resamples,
                          config.seed)
    task.finish(report, scores)
    markdown = render_markdown(report)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (out / REPORT_MD).write_text(markdown)
    plot_scores(report, out / SCORES_PLOT)
    return Summary(report, markdown + f"wrote {out}/{REPORT_JSON}, {REPORT_MD}, {SCORES_PLOT}; overall "
                                      f"{report['overall']}")


def run_systems(config: EvalConfig, task: Task) -> SystemsRun:
    """Every checkpoint's answers (from the audio and its own Whisper transcript), its references' answers and
    its LLM's probes, each computed once per key in the answer cache."""
    cache = AnswerCache(config.cache)
    run = SystemsRun(speech=systems.system_names(config.checkpoints))
    prompt = config.system_prompt if config.system_prompt is not None else task.system_prompt
    for name, path in zip(run.speech, config.checkpoints, strict=True):
        system = systems.load_system(path, prompt, run.text_llm, config.dtype)
        model, processor = system.model, system.processor
        run.text_llm = system.llm_name
        settings = {"items": task.key, "max_new_tokens": config.max_new_tokens,
                    "system_prompt": processor.system_prompt,
                    **({"dtype": config.dtype} if config.dtype != "float32" else {})}
        if config.gold_transcripts:
            transcripts = {i["id"]: i.get("transcript") or "" for i in task.items}
        else:  # the same Whisper gives the same transcripts
            transcripts = cache.get({"kind": "whisper", "encoder": system.encoder_key, "items": task.key},
                                    systems.clip_transcripts, model, processor, task.items, config.batch_size,
                                    config.progress)
        run.answers[name], run.timing[name] = cache.get(
            {"kind": "speech", "checkpoint": system.weights, "transcripts": fingerprint(transcripts), **settings},
            systems.speech_answers, model, processor, task.items, transcripts, config.batch_size,
            config.max_new_tokens, config.progress)
        backend = system.backend(config.batch_size)
        # the references are the base LLM: LoRA adapters, if any, are switched off for them
        with model.llm.disable_adapter() if model.config.lora else contextlib.nullcontext():
            reference = task.references(name, system, backend, transcripts, settings, cache, run)
        if reference:
            run.asr_of[name] = reference
        if task.own_references is not None and model.config.lora is not None:
            task.own_references(name, system, backend, transcripts, settings, cache, run)  # LoRA on: as trained
        if task.groups:
            from desta.evaluation.groups import training_data

            run.training[name] = training_data(path, config.trained_tasks, config.train_voices)
            _warn_seen_voices(name, task.items, run.training[name])
        gold = {i["id"]: i.get("transcript") for i in task.items if i.get("transcript")}
        if gold and not config.gold_transcripts:
            run.whisper_wer[name] = float(np.mean([word_error_rate(g, transcripts[c]) for c, g in gold.items()]))
        if config.probes and task.probes:
            from desta.core.probes import retention_probes

            # without LoRA the checkpoint's LLM is the frozen base: its probes are the base's, computed once
            llm_weights = system.weights if model.config.lora is not None else None
            key = {"kind": "probes", "checkpoint": llm_weights, "llm": run.text_llm,
                   "max_new_tokens": config.probe_max_new_tokens}
            run.probes[name] = cache.get({**key, **({"dtype": config.dtype} if config.dtype != "float32" else {})},
                                         retention_probes, backend, config.probe_max_new_tokens)
        del system, model, backend
    if config.teacher_model and task.teacher_references is not None:
        task.teacher_references(config, cache, run)
    return run


def _warn_seen_voices(name: str, items: list[dict], data: Any) -> None:
    """Say when eval clips speak with voices the checkpoint was trained on (then "unseen" means new clips only)."""
    if data.voices is None or not all(i.get("voice") for i in items):
        return
    clips = {i["id"]: i["voice"] for i in items}
    seen = [c for c, v in clips.items() if v in data.voices]
    if seen:
        print(f"warning: {len(seen)} of {len(clips)} eval clips speak with voices {name} was trained on "
              f"(from {data.source}); the report scores seen and unseen voices apart", flush=True)


# ----- an eval set of desta's own -----

class EvalSetReferences:
    """The text references of an eval set's items: the base LLM reading the gold description (and, once per
    Whisper, the description with that Whisper's transcript), each checkpoint's own LLM, and the targets' teacher
    reading what the first system's references read. Each fills `run.answers` through the answer cache."""

    def __init__(self, config: EvalConfig, items: list[dict]):
        self.config, self.items = config, items
        self.has_descriptions = all(i.get("description") for i in items)
        self.encoders: dict[str, str] = {}  # Whisper -> the name of the reference reading its transcripts
        self.read: dict[str, Any] = {}  # what the first system's references read: the teacher reads the same

    def _answer(self, run: SystemsRun, cache: AnswerCache, reference: str, what: str, key: dict[str, Any],
                backend: Any, described: list[str], prompt: str | None) -> None:
        run.references[reference] = what
        run.answers[reference], run.timing[reference] = cache.get(
            {**key, "descriptions": fingerprint(described)}, systems.text_answers, backend, self.items, described,
            self.config.max_new_tokens, prompt, self.config.progress)

    def base(self, name: str, system: SpeechSystem, backend: Any, transcripts: dict[str, str],
             settings: dict[str, Any], cache: AnswerCache, run: SystemsRun) -> str | None:
        """The base LLM's references (once); returns the name of the one reading this system's Whisper transcript."""
        if not self.has_descriptions:
            return None
        config, items = self.config, self.items
        reference = {"kind": "text", "llm": run.text_llm, **settings}
        prompt = system.processor.system_prompt
        self.read.setdefault("settings", settings)
        self.read.setdefault("prompt", prompt)
        if TEXT not in run.answers:
            self._answer(run, cache, TEXT, "the base LLM (LoRA off) reading the description with the gold transcript",
                         reference, backend, [i["description"] for i in items], prompt)
        if not config.asr_reference or config.gold_transcripts:
            return None
        if system.encoder_key not in self.encoders:
            self.encoders[system.encoder_key] = TEXT_ASR if not self.encoders else f"{TEXT_ASR}:{name}"
            described = [with_transcript(i["description"], transcripts[i["id"]]) for i in items]
            self.read.setdefault("asr", described)
            self._answer(run, cache, self.encoders[system.encoder_key], "the base LLM (LoRA off) reading the "
                         "description with the speech model's Whisper transcript", reference, backend, described,
                         prompt)
        return self.encoders[system.encoder_key]

    def own(self, name: str, system: SpeechSystem, backend: Any, transcripts: dict[str, str],
            settings: dict[str, Any], cache: AnswerCache, run: SystemsRun) -> None:
        """The checkpoint's own LLM as trained (LoRA on) reading the description."""
        if not self.has_descriptions:
            return None
        config, items = self.config, self.items
        readings = [(f"{TEXT_OWN}:{name}", [i["description"] for i in items], "the gold transcript")]
        if config.asr_reference and not config.gold_transcripts:
            readings.append((f"{TEXT_OWN_ASR}:{name}", [with_transcript(i["description"], transcripts[i["id"]])
                                                        for i in items], "its Whisper transcript"))
        for reference, described, what in readings:
            self._answer(run, cache, reference, f"{name}'s LLM as trained (LoRA on) reading the description with "
                         f"{what}", {"kind": "text own", "checkpoint": system.weights, **settings}, backend,
                         described, system.processor.system_prompt)
        return None

    def teacher(self, config: EvalConfig, cache: AnswerCache, run: SystemsRun) -> None:
        """The targets' teacher reading what the base LLM's references read."""
        if not self.has_descriptions or "settings" not in self.read:
            return
        import torch

        from desta.core.generation import make_backend

        backend = make_backend("transformers", config.teacher_model, batch_size=config.batch_size,
                               dtype=getattr(torch, config.dtype))
        readings = [(TEACHER, [i["description"] for i in self.items], "the gold transcript")]
        if "asr" in self.read:
            readings.append((TEACHER_ASR, self.read["asr"], "the speech model's Whisper transcript"))
        for reference, described, what in readings:
            self._answer(run, cache, reference, f"the targets' teacher ({config.teacher_model}) reading the "
                         f"description with {what}", {"kind": "teacher", "llm": config.teacher_model,
                                                      **self.read["settings"]},
                         backend, described, self.read["prompt"])


def eval_set_task(config: EvalConfig) -> Task:
    """Items of an eval set; references: the LLM reading the gold description, and (once per Whisper) the
    description with that Whisper's transcript in place of the gold one (EvalSetReferences)."""
    dataset = load_eval_set(config.eval_set, config.columns or None)
    if config.limit:
        dataset = dataset.select(range(min(config.limit, len(dataset))))
    items = [dict(row) for row in dataset]
    if not items:
        raise ValueError(f"{config.eval_set} holds no items")
    for path in config.checkpoints:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {path} not found; give a folder written by desta train or export")
    references = EvalSetReferences(config, items)
    key = fingerprint([[i["item_id"], i["instruction"], i.get("description"), audio_key(i["audio"])] for i in items])
    return Task(items=items, key=key, system_prompt=None, score=score_item, references=references.base, probes=True,
                judging=Judging(prompt=judge_prompt, verdict=judge_verdict, max_new_tokens=4),
                own_references=references.own, teacher_references=references.teacher, groups=True)


# ----- a public benchmark, scored as its authors score it -----

def benchmark_task(config: EvalConfig) -> Task:
    """Items of a benchmark in its published layout (OUT/rejects.jsonl: those its loader could not use); the
    reference, where the benchmark has a text version of each item, is the same LLM reading that text; scored
    by the authors' rules, with the figures as the authors report them added to the report."""
    from desta.core.chunks import to_jsonl
    from desta.evaluation.benchmarks import benchmark

    bench = benchmark(config.benchmark)
    items, rejects = bench.load(config.eval_set, config.subsets)
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
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / REJECTS).write_text(to_jsonl(rejects))

    def references(name: str, system: SpeechSystem, backend: Any, transcripts: dict[str, str],
                   settings: dict[str, Any], cache: AnswerCache, run: SystemsRun) -> str | None:
        if bench.text_reference and TEXT not in run.answers:
            prompt = system.processor.system_prompt
            turns = [with_system([{"role": "user", "content": i["text_input"]}], prompt) for i in items]
            run.answers[TEXT], run.timing[TEXT] = cache.get(
                {"kind": "benchmark text", "llm": run.text_llm, **settings}, systems.generate_with_progress,
                backend, turns, config.max_new_tokens, "text reference", config.progress)
        return None

    def finish(report: dict[str, Any], scores: dict[str, list[dict]]) -> None:
        official = {system: bench.official(items, results) for system, results in scores.items()}
        for row, item in zip(report["per_item"], items, strict=True):
            if not row["instruction"]:  # VoiceBench: the audio is the whole turn; show what it says
                row["instruction"] = f"(spoken) {item['text_input']}"
        reference = (f"the same LLM reading the benchmark's own text of each item (the text-gold column): "
                     f"{bench.text_reference}") if bench.text_reference else None
        report.update(
            title=f"# desta eval --benchmark {bench.name}: {len(items)} items ({len(rejects)} rejected)",
            intro=(f"Speech model(s) on {bench.name} ({bench.published}), scored by its authors' rules; "
                   + (f"the reference is {reference}; forgetting = (speech - text) / text. " if reference else
                      "the benchmark has no text version of its items, so no text reference. ")
                   + f"Per-item scores in [0, 1] per subset; cells: value [{report['interval']}]; ~ marks a "
                   "difference whose interval includes 0." + (f" Judge: {report['judge']}." if report["judge"] else
                                                              " No judge: judged subsets unscored.")),
            benchmark={"name": bench.name, "source": config.eval_set, "subsets": config.subsets,
                       "rejected": len(rejects), "official": official, "reference": reference},
            references={TEXT: reference} if reference else {})

    key = fingerprint([bench.name, [[i["item_id"], i["instruction"], i["text_input"], audio_key(i["audio"])]
                                    for i in items]])
    return Task(items=items, key=key, system_prompt=bench.system_prompt, references=references, probes=False,
                score=lambda item, answer: bench.score(item, answer, config.seed),
                judging=bench.judging or Judging(prompt=lambda item, answer: None, verdict=lambda item, r: {}),
                finish=finish)
