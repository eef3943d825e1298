"""`desta posttrain`: measure the base model, train each strategy (and seed) from it, measure again, compare.

Reads the config (desta.posttrain.config). Writes OUT/base/ (the base model's per-item scores and answers,
its reference answers, the default replay set, the knowledge split the knowledge_known and
knowledge_unknown runs share), OUT/<strategy>/seed-<seed>/ (the training data, the answers, metrics.json
with per-item scores and deltas, the model when save_models or save_models_of), OUT/comparison.json,
OUT/comparison.md, OUT/forgetting.png and, with a replay sweep, OUT/replay_sweep.png.

Resumable run by run: a run whose metrics.json exists was finished and is not trained again, provided
the settings it was made with (its fingerprint: every setting that changes what it does, and the
content of the model and data files) equal the config's; a finished run made with other settings is
refused before anything trains, naming what changed, or redone with overwrite=true. A run killed midway
has no metrics.json and starts over.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desta.core.artifacts import COMPARISON_JSON, COMPARISON_MD, FORGETTING_PLOT, REPLAY_SWEEP_PLOT
from desta.core.chunks import differences, read_jsonl, to_jsonl, write_atomic
from desta.core.digests import content_digest
from desta.core.generation import TransformersBackend
from desta.core.llm import default_device, default_dtype, load_causal_lm, load_chat_llm
from desta.core.summary import Summary
from desta.posttrain.config import MOVED, PostTrainConfig, plan_settings
from desta.posttrain.data import strategy_data
from desta.posttrain.report import (
    delta_stats,
    head_to_head,
    plot_forgetting,
    plot_replay_sweep,
    render_comparison,
    summarize,
)
from desta.posttrain.retention import means, measure, reference_answers, retention_sets
from desta.posttrain.strategies import foreign_settings, parts, records, trains
from desta.posttrain.tasks import load_task, read_rows, replay_set
from desta.posttrain.training import train_model
from desta.posttrain.verifiers import Verifier, make_verifier

METRICS = "metrics.json"  # written last: its presence marks a run finished
BASE = "base"
ANSWERS = "answers.jsonl"  # every answer of a run, item by item
REFERENCES = "references.json"  # the base run's answers the others are compared with
# The settings the base measurement depends on (with the sources' fingerprint).
BASE_SETTINGS = ("model", "chat_template", "task", "retention", "eval_max_new_tokens", "probe_max_new_tokens",
                 "generation_batch_size", "answer_max_new_tokens")


@dataclass(frozen=True)
class Run:
    """One training run: a strategy, a seed and, for a replay-sweep point, its own replay ratio."""

    strategy: str
    seed: int
    replay_ratio: float | None = None

    @property
    def name(self) -> str:
        """The strategy, or strategy@ratio for a sweep point, e.g. replay@0.05."""
        return self.strategy if self.replay_ratio is None else f"{self.strategy}@{self.replay_ratio:g}"

    @property
    def folder(self) -> str:
        """Where the run writes, relative to the output folder, e.g. lora+replay/seed-42."""
        return f"{self.name}/seed-{self.seed}"

    @property
    def parts(self) -> tuple[str, ...]:
        """The strategies the run combines, e.g. ("lora", "replay")."""
        return parts(self.strategy)


def plan_runs(config: PostTrainConfig) -> tuple[list[Run], list[tuple[float, str]]]:
    """Every run to make, and the replay sweep's points as (ratio, the run name that stands for it): 0 is
    sft, the configured replay.ratio is the `replay` run (when it is a strategy), other ratios get runs of
    their own with the first seed."""
    seeds = config.run_seeds
    seeded = set(config.strategies if config.seeded_strategies is None else config.seeded_strategies)
    runs = [Run(name, seed) for name in config.strategies for seed in (seeds if name in seeded else seeds[:1])]
    sweep = []
    for ratio in config.replay_sweep:
        if ratio == 0:
            sweep.append((ratio, "sft"))
        elif ratio == config.replay.ratio and "replay" in config.strategies:
            sweep.append((ratio, "replay"))
        else:
            runs.append(Run("replay", seeds[0], ratio))
            sweep.append((ratio, runs[-1].name))
    return runs, sweep


def run_config(config: PostTrainConfig, run: Run) -> PostTrainConfig:
    """The config one run trains with: its seed in optim.seed, its replay ratio (replay.ratio) where it has its own."""
    ratio = config.replay.ratio if run.replay_ratio is None else run.replay_ratio
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, seed=run.seed),
                               replay=dataclasses.replace(config.replay, ratio=ratio))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys, for naming what changed.

    >>> _flat({"a": 1, "b": {"c": 2}})
    {'a': 1, 'b.c': 2}
    """
    if not isinstance(value, dict) or not value:
        return {prefix[:-1]: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(_flat(inner, f"{prefix}{key}."))
    return out


def run_settings(config: PostTrainConfig, run: Run, sources: dict[str, str]) -> dict[str, Any]:
    """A run's fingerprint: every setting of its config but those that choose the runs and those only strategies
    it lacks depend on (a section left empty goes), with the content digests of its sources (model and data
    files)."""
    settings = {k: v for k, v in dataclasses.asdict(run_config(config, run)).items() if k not in plan_settings()}
    for key in foreign_settings(run.parts):
        section, name = key.split(".")
        del settings[section][name]
        if not settings[section]:
            del settings[section]
    return json.loads(json.dumps({**settings, "strategy": run.strategy, "sources": sources}))


# Settings added after runs were recorded, with the value that does what those runs did: a run recorded without
# one is the same run as one with this value.
ADDED = {("optim", "schedule"): "cosine", ("optim", "min_lr_ratio"): 0.0}


def upgraded(settings: dict[str, Any]) -> dict[str, Any]:
    """A run fingerprint in today's layout: one written before the strategies had sections (flat keys such as
    replay_ratio, desta.posttrain.config.MOVED) with each moved key in its new place, and each setting added since
    (ADDED) at the value those runs ran with, so a run finished then is still recognised.

    >>> upgraded({"replay_ratio": 0.03, "grpo": {"beta": 0.0}, "model": "m"})
    {'model': 'm', 'replay': {'ratio': 0.03}, 'rl': {'grpo': {'beta': 0.0}}}
    >>> upgraded({"optim": {"lr": 0.001}})["optim"]
    {'lr': 0.001, 'schedule': 'cosine', 'min_lr_ratio': 0.0}
    """
    out = {k: v for k, v in settings.items() if k not in MOVED}
    if set(settings) & (set(MOVED) - {f.name for f in dataclasses.fields(PostTrainConfig)}):
        for old, new in MOVED.items():
            if old in settings:
                section, _, key = new.partition(".")
                if key:
                    out.setdefault(section, {})[key] = settings[old]
                else:
                    out[section] = settings[old]
    for (section, key), value in ADDED.items():  # recorded before the setting existed: it ran as this value
        if isinstance(out.get(section), dict):
            out[section] = {**out[section], key: out[section].get(key, value)}
    return out


def base_settings(config: PostTrainConfig, sources: dict[str, str]) -> dict[str, Any]:
    """The base measurement's fingerprint: the settings it depends on and the sources' digests."""
    return json.loads(json.dumps({**{k: getattr(config, k) for k in BASE_SETTINGS if k != "task"},
                                  "precision": config.optim.precision, "task": dataclasses.asdict(config.task),
                                  "retention": dataclasses.asdict(config.retention), "sources": sources}))


def source_digests(config: PostTrainConfig) -> dict[str, str]:
    """SHA-256 of the content of the local model folder and data files a run reads (a Hub id stands for itself),
    so a run made from other weights or data is never taken for this one."""
    named = {"model": config.model, "task.train": config.task.train, "task.eval": config.task.eval,
             "replay_data": config.replay.data}
    return {key: content_digest(Path(value)) if Path(value).exists() else value
            for key, value in named.items() if value}


def finished(folder: Path, settings: dict[str, Any]) -> tuple[dict | None, list[str]]:
    """A finished result in `folder` made with `settings` (else None), and, for one made with other settings,
    what changed."""
    path = folder / METRICS
    if not path.is_file():
        return None, []
    result = json.loads(path.read_text())
    changed = differences(_flat(upgraded(result.get("settings", {}))), _flat(settings))
    return (None, changed) if changed else (result, [])


def check_resume(out: Path, planned: dict[str, dict[str, Any]], overwrite: bool) -> dict[str, dict]:
    """The finished results among `planned` (folder -> settings); refuses, before anything runs, when a
    finished one was made with other settings (unless `overwrite`, which lets them be redone)."""
    done, stale = {}, []
    for folder, settings in planned.items():
        result, changed = finished(out / folder, settings)
        if result is not None:
            done[folder] = result
        elif changed:
            stale.append(f"{folder} ({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''})")
    if stale and not overwrite:
        raise ValueError(f"{out} holds finished runs made with other settings: {', '.join(stale)}; set overwrite=true "
                         "to redo them, or choose another output_dir")
    return done


def load_model(config: PostTrainConfig) -> tuple[Any, Any]:
    """The model and its tokenizer (desta.core.llm.load_chat_llm); with config.chat_template, a model whose tokenizer
    has no chat template (a base model) gets that one."""
    if config.chat_template is None:
        return load_chat_llm(config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    tokenizer.chat_template = config.chat_template
    return load_causal_lm(config.model, dtype=default_dtype()).to(default_device()).eval(), tokenizer


def generation_backend(llm: Any, tokenizer: Any, config: PostTrainConfig) -> TransformersBackend:
    """Generation with this config's batch size, in bf16 under autocast when optim.precision is bf16 (the
    likelihoods, computed on the model itself, stay in its own dtype)."""
    import torch

    return TransformersBackend(llm=llm, tokenizer=tokenizer, batch_size=config.generation_batch_size,
                               autocast=torch.bfloat16 if config.optim.precision == "bf16" else None)


@dataclass
class Shared:
    """What every run reads: the task, the retention sets and references, the replay set, the base scores."""

    train_rows: list[dict]
    eval_rows: list[dict]
    verifier: Verifier
    sets: dict[str, list[dict]]
    references: list[str]
    replay_rows: list[dict]
    base: dict[str, Any]
    cache: Path | None = None
    """where data several runs share is kept (the knowledge split): OUT/base"""


def train_run(run: Run, config: PostTrainConfig, shared: Shared, folder: Path, settings: dict[str, Any],
              log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Train one run from the base model (rule_adapter alone: none), measure it, write its folder; returns its
    result (metrics.json)."""
    if folder.exists():
        shutil.rmtree(folder)  # what an unfinished or outdated run left
    folder.mkdir(parents=True)
    started = time.perf_counter()
    llm, tokenizer = load_model(config)
    base_backend = generation_backend(llm, tokenizer, config)
    rows, examples, notes = strategy_data(run.parts, base_backend, config, shared.train_rows, shared.replay_rows,
                                          shared.verifier, shared.cache)
    if "knowledge" in notes:
        write_atomic(folder / "knowledge.jsonl", to_jsonl(notes["knowledge"].pop("rows")))
    write_atomic(folder / "train_data.jsonl", to_jsonl(rows))
    model, losses, trained_notes = train_model(run.parts, llm, tokenizer, rows, examples, config, shared.verifier,
                                               base_backend.pad_id, folder / "trainer")
    notes |= trained_notes
    model.eval()
    trained = generation_backend(model, tokenizer, config)
    # decoding rules (rule_adapter) on every answer, and on the likelihood of the base model's answers
    adapter = next((r.decoding(tokenizer, trained.eos_ids, config) for r in records(run.parts) if r.decoding), None)
    if adapter is not None:
        from transformers import LogitsProcessorList

        trained.logits_processor = LogitsProcessorList([adapter])
    log(f"  trained in {time.perf_counter() - started:.0f} s (its data and training); measuring")
    scores, answers = measure(trained, shared.eval_rows, shared.verifier, shared.sets, shared.references,
                              config.eval_max_new_tokens, config.probe_max_new_tokens, log, adapter)
    write_atomic(folder / ANSWERS, to_jsonl(answers))
    if (config.save_models or run.strategy in config.save_models_of) and trains(run.parts):
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
    result = {"name": run.name, "strategy": run.strategy, "seed": run.seed, "replay_ratio": config.replay.ratio,
              "settings": settings, "train_rows": len(rows) if trains(run.parts) else 0,
              "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
              "notes": notes, "metrics": means(scores), "deltas": delta_stats(shared.base["scores"], [scores]),
              "scores": scores, "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(folder / METRICS, json.dumps(result, indent=1))
    return result


def measure_base(config: PostTrainConfig, folder: Path, settings: dict[str, Any], eval_rows: list[dict],
                 verifier: Verifier, sets: dict[str, list[dict]], log: Callable[[str], None]) -> dict[str, Any]:
    """The base model's reference answers and per-item scores, written to `folder` (metrics.json last)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    backend = generation_backend(*load_model(config), config)
    log(f"base model: reference answers to {len(sets['own_answer'])} general requests")
    references = reference_answers(backend, sets["own_answer"], config.retention.own_answer_max_new_tokens)
    write_atomic(folder / REFERENCES, json.dumps(references))
    log(f"base model: measuring {len(eval_rows)} task questions and the retention sets")
    scores, answers = measure(backend, eval_rows, verifier, sets, references, config.eval_max_new_tokens,
                              config.probe_max_new_tokens, log)
    write_atomic(folder / ANSWERS, to_jsonl(answers))
    base = {"settings": settings, "scores": scores, "means": means(scores),
            "items": {k: len(v) for k, v in scores.items()}, "seconds": round(time.perf_counter() - started, 1)}
    write_atomic(folder / METRICS, json.dumps(base, indent=1))
    return base


def base_replay_rows(config: PostTrainConfig, folder: Path) -> list[dict]:
    """The replay set: replay.data, or the base model's answers to general requests, made once and kept in
    OUT/base/replay.jsonl."""
    if config.replay.data:
        return read_rows(config.replay.data, "replay.data")
    path = folder / "replay.jsonl"
    if not path.is_file():
        backend = generation_backend(*load_model(config), config)
        write_atomic(path, to_jsonl(replay_set(backend, config.answer_max_new_tokens)))
    return read_jsonl(path)


def posttrain(config: PostTrainConfig, log: Callable[[str], None] = print) -> Summary:
    """Measure the base model, then train and measure each run not finished yet; write the comparison."""
    verifier = make_verifier(config.task.verifier)
    train_rows, eval_rows = load_task(config.task)
    sets = retention_sets(config.retention)
    out = Path(config.output_dir)
    sources = source_digests(config)
    runs, sweep = plan_runs(config)
    planned = {BASE: base_settings(config, sources)}
    planned |= {run.folder: run_settings(config, run, sources) for run in runs}
    done = check_resume(out, planned, config.overwrite)
    invocation = time.perf_counter()
    base = done.get(BASE) or measure_base(config, out / BASE, planned[BASE], eval_rows, verifier, sets, log)
    references = json.loads((out / BASE / REFERENCES).read_text())
    needs_replay = any(r.stage == "replay" for run in runs if run.folder not in done for r in records(run.parts))
    shared = Shared(train_rows, eval_rows, verifier, sets, references,
                    base_replay_rows(config, out / BASE) if needs_replay else [], base, out / BASE)
    results = []
    for number, run in enumerate(runs, 1):
        if run.folder in done:
            log(f"[{number}/{len(runs)}] {run.folder}: finished earlier with the same settings, kept")
            results.append(done[run.folder])
            continue
        log(f"[{number}/{len(runs)}] {run.folder}: training")
        result = train_run(run, run_config(config, run), shared, out / run.folder, planned[run.folder], log)
        d = result["deltas"]
        log(f"  task {base['means']['task_accuracy']:.2f} -> {result['metrics']['task_accuracy']:.2f}; retained "
            f"{d['retained']['value']:+.3f}; own-answer log-lik {d['own_answer_loglik']['value']:+.3f} "
            f"({result['seconds']:.0f} s)")
        results.append(result)
    strategies, points = summarize(results, base, sweep, config.run_seeds[0])
    comparison = {"model": config.model, "style": config.style, "base": {k: base[k] for k in ("means", "items")},
                  "strategies": strategies, "sweep": points,
                  "head_to_head": head_to_head(results, config.head_to_head, config.run_seeds[0]),
                  "runs": [{k: v for k, v in r.items() if k not in ("scores", "settings")} for r in results],
                  "seconds": round(base["seconds"] + sum(r["seconds"] for r in results), 1),
                  "seconds_this_invocation": round(time.perf_counter() - invocation, 1)}
    markdown = render_comparison(comparison)
    write_atomic(out / COMPARISON_JSON, json.dumps(comparison, indent=1))
    write_atomic(out / COMPARISON_MD, markdown)
    plot_forgetting(comparison, out / FORGETTING_PLOT)
    if points:
        plot_replay_sweep(points, out / REPLAY_SWEEP_PLOT)
    return Summary(comparison, markdown)
