"""Stage 2, targets: what the speech model will learn to answer, one row per (clip, prompt).

Reads a described dataset (OUT/dataset of `desta describe`). Two kinds of target:
- self_output (DeSTA2): the text LLM reads each description and answers a prompt from the pool;
  its own answer is the target;
- labels: an answer written from the gold labels and transcript by a template, no LLM: the targets a
  conventional speech-instruction set has, kept for comparison.
Writes OUT/dataset: the described rows plus `prompt`, `prompt_pool`, `system_prompt` (what the LLM
read, carried to training), `response` and `generator` (model id, backend, sampling settings as
JSON); OUT/rejects.jsonl for answers the quality filter flags (empty, cut off, looping, ignoring the
audio), each with its reason; OUT/summary.json. Chunks make it resumable and shardable like describe:
a rerun into the same OUT must read the same described rows (by content) with the same settings, and
answers are joined to their clips by id.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm import tqdm

from desta.core.args import raise_problems
from desta.core.chunks import (
    ChunkedJob,
    ChunkingSection,
    check_accounted,
    job_settings,
    positions_by_id,
    saved_empty,
    stale_error,
)
from desta.core.digests import content_fingerprint
from desta.core.generation import Backend, Generation, GenerationSection, SamplingSection, SamplingSettings
from desta.core.quality import looping
from desta.core.summary import Summary
from desta.prompts import (
    DEFAULT_SYSTEM_PROMPT,
    OPEN,
    Pool,
    field_answer,
    pick_prompts,
    prompt_category,
    restrict_pool,
    text_turn,
    training_pool,
)

if TYPE_CHECKING:
    from datasets import Dataset

# Answers that show the model did not "hear" the description (case-insensitive regular expressions).
DEFAULT_REFUSAL_PATTERNS = [
    r"\bI (?:cannot|can't|can ?not|am unable to|'m unable to|do not|don't) (?:hear|listen|access|play|process)\b",
    r"\b(?:do not|don't|cannot|can't) have (?:the ability|access) to (?:hear|listen|audio|play)",
    r"\bas an? (?:AI|text-based|(?:large )?language)(?: language)? (?:model|assistant)\b",
    r"\bno audio (?:was|is|has been) (?:provided|attached|shared)\b",
    r"\b(?:cannot|can't|unable to) (?:hear|listen to|access|play) (?:the |this |any )?(?:audio|recording|clip)\b",
]
# Settings that moved into the shared sections (desta.core): an old key in a YAML file or on a command line is refused
# with its new place (desta.core.args).
MOVED = {**{name: f"generation.{name}" for name in (
    "model", "base_url", "dtype", "batch_size", "batching", "token_budget", "cache", "prompts_per_call",
    "max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "concurrency", "timeout", "max_retries")},
    "backend": "generation.kind",
    **{name: f"sampling.{name}" for name in ("max_new_tokens", "temperature", "top_p", "repetition_penalty")},
    **{name: f"chunking.{name}" for name in ("chunk_size", "num_shards", "shard_index", "merge", "overwrite")}}


@dataclass
class TargetsConfig:
    """The text LLM answers instructions from each description; its answers become training targets."""

    MOVED = MOVED

    source: str = ""
    """a described dataset folder (OUT/dataset of desta describe)"""
    out: str = ""
    """output folder"""
    kind: Literal["self_output", "labels"] = "self_output"
    """self_output: the LLM's own answers (DeSTA2); labels: a template over the gold labels, no LLM"""
    pool: str | list[str] = "desta2"
    """prompt pool name (desta2, desta25; voice: also questions about each field the description holds) or a
    list of prompts"""
    prompts_per_clip: int = 1
    """distinct prompts per clip: one output row each"""
    fields: list[str] | None = None
    """ask only the pool's questions about these fields (a field pool's categories: gender, pitch, ..., open);
    null: all. With kind labels, a field question's answer names that field's gold value alone"""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """system turn the LLM reads (null: none); stored with each row, so training uses the same"""
    seed: int = 0
    """prompts and sampling depend only on it (and the row)"""
    generation: GenerationSection = field(default_factory=GenerationSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    chunking: ChunkingSection = field(default_factory=ChunkingSection)
    refusal_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS))
    """regular expressions of answers that ignore the audio"""
    keep_flagged: bool = False
    """keep flagged answers in the dataset with a `flag` column instead of rejecting them"""
    trim_cut_off: bool = False
    """answers cut at sampling.max_new_tokens end at their last full sentence instead of being rejected"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        problems = []
        if not self.out:
            problems.append(("out", "required: the output folder"))
        if not self.chunking.merge:
            if not self.source:
                problems.append(("source", "required: the described dataset folder (OUT/dataset of desta describe)"))
            if self.kind == "self_output" and not self.generation.model:
                problems.append(("generation.model", "required for self_output targets: the LLM's Hub id or folder"))
            if self.generation.kind == "http" and not self.generation.base_url:
                problems.append(("generation.base_url", "the http backend needs base_url, e.g. "
                                                        "http://127.0.0.1:8000/v1"))
            try:
                restrict_pool(training_pool(self.pool), self.fields)
            except ValueError as err:
                problems.append(("fields" if self.fields and "categories" in str(err) else "pool", str(err)))
        if self.prompts_per_clip < 1:
            problems.append(("prompts_per_clip", f"must be at least 1, got {self.prompts_per_clip}"))
        for pattern in self.refusal_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(("refusal_patterns", f"{pattern!r} is not a regular expression ({err})"))
        raise_problems(problems)

    def chunk_sampling(self, chunk: int = 0) -> SamplingSettings:
        """The sampling settings for one chunk: its seed is `seed + chunk`, so each chunk draws differently
        and a rerun of the chunk draws the same."""
        return self.sampling.seeded(self.seed + chunk)


# ----- label targets: what a conventional speech-instruction set has -----

def label_response(row: dict[str, Any]) -> str:
    """An answer written from the gold labels and transcript only (never the description text).

    >>> print(label_response({"gender": "Female", "accent": "British", "emotion": "Neutral",
    ...     "speaking_speed": "Slow", "pitch": "High", "volume": "Low", "duration": 2.2, "transcript": "Excuse me?"}))
    ... # doctest: +NORMALIZE_WHITESPACE
    A female speaker with a British accent says: "Excuse me?" The voice sounds neutral, the pace is slow,
    the pitch high and the volume low. The clip lasts about 2 seconds.
    """
    who = f"A {row['gender'].lower()} speaker" if row.get("gender") else "A speaker"
    if row.get("accent"):
        who += f" with {'an' if row['accent'][0] in 'AEIOU' else 'a'} {row['accent']} accent"
    if row.get("age"):
        who += f" (age {row['age']})"
    text = f'{who} says: "{(row.get("transcript") or "").strip()}"'
    voice = [f"the voice sounds {row['emotion'].lower()}" if row.get("emotion") else None,
             f"the pace is {row['speaking_speed'].lower()}" if row.get("speaking_speed") else None,
             f"the pitch {row['pitch'].lower()}" if row.get("pitch") else None,
             f"the volume {row['volume'].lower()}" if row.get("volume") else None]
    voice = [v for v in voice if v]
    if voice:
        sentence = ", ".join(voice[:-1]) + (" and " if len(voice) > 1 else "") + voice[-1]
        text += " " + sentence[0].upper() + sentence[1:] + "."
    if row.get("duration"):
        text += f" The clip lasts about {max(1, round(float(row['duration'])))} seconds."
    return text


def label_answer(row: dict[str, Any], category: str) -> str:
    """A label target for a prompt of `category`: a question about one field is answered with that field's gold
    value alone (`desta.prompts.field_answer`), an open request with `label_response`.

    >>> label_answer({"gender": "Male", "accent": "Scottish", "transcript": "Hi."}, "gender")
    'The speaker is male.'
    """
    value = row.get(category)
    if category == OPEN or value in (None, ""):
        return label_response(row)
    return field_answer(category, value)


def flag(generation: Generation, max_new_tokens: int, refusal_patterns: list[str]) -> str | None:
    """Why an answer is unfit as a target, or None.

    >>> flag(Generation("", "stop", 0), 100, [])
    'empty answer'
    >>> flag(Generation("I cannot hear audio.", "stop", 5), 100, DEFAULT_REFUSAL_PATTERNS)[:23]
    'ignores the audio: "I c'
    """
    text = generation.text.strip()
    if not text:
        return "empty answer"
    if generation.finish_reason == "length":
        return f"cut off at max_new_tokens ({max_new_tokens})"
    loop = looping(text)
    if loop:
        return loop
    for pattern in refusal_patterns:
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return f'ignores the audio: "{match.group(0)}"'
    return None


def trim_to_sentence(generation: Generation, min_chars: int = 40) -> Generation:
    """An answer cut at max_new_tokens, shortened to its last complete sentence (if one is long enough).

    >>> trim_to_sentence(Generation("It is a man. He speaks slowly and", "length", 9)).text
    'It is a man.'
    """
    if generation.finish_reason != "length":
        return generation
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", generation.text)]
    if not ends or ends[-1] < min(min_chars, len(generation.text)) // 4:
        return generation
    text = generation.text[: ends[-1]].strip()
    return Generation(text, "stop", generation.completion_tokens) if len(text) >= 8 else generation


def load_described(source: str | os.PathLike) -> Dataset:
    """The dataset `desta describe` wrote (OUT/dataset), checked for the id and description columns and rows."""
    from datasets import load_from_disk

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found; give the dataset folder written by desta describe "
                                "(OUT/dataset)")
    if saved_empty(path):
        raise ValueError(f"{path} holds no rows")
    dataset = load_from_disk(str(path))
    missing = [c for c in ("id", "description") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path} is not a described dataset: no column {missing} (columns: "
                         f"{dataset.column_names}); run `desta describe` first")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no rows")
    return dataset


GOLD_COLUMNS = ("transcript", "gender", "accent", "emotion", "age", "pitch", "volume", "speaking_speed", "duration")


def source_fingerprint(dataset: Dataset) -> str:
    """The content fingerprint of a described dataset: every column but the audio, row by row."""
    return content_fingerprint(dataset, [c for c in dataset.column_names if c != "audio"])


def row_fields(dataset: Dataset) -> list[set[str]]:
    """The description fields each row holds (a gold column with a value), which a field pool may ask about."""
    columns = [c for c in GOLD_COLUMNS if c in dataset.column_names]
    table = dataset.select_columns(columns).to_dict() if columns else {}
    return [{c for c in columns if table[c][row] not in (None, "")} for row in range(len(dataset))]


def target_items(fields: list[set[str]], pool: Pool | list[str], seed: int,
                 per_clip: int) -> list[tuple[int, str]]:
    """(row, prompt) of every answer to write: `per_clip` prompts per row, a pure function of (seed, row) and
    the fields the row's description holds."""
    return [(row, prompt) for row, held in enumerate(fields)
            for prompt in pick_prompts(pool, row, seed, per_clip, held)]


def _stored_pool(pool: Pool) -> Pool | list[str]:
    """How a job records its pool: a flat pool as its list of prompts (as jobs always have), else by field."""
    return pool[OPEN] if list(pool) == [OPEN] else pool


def targets(config: TargetsConfig, backend: Backend | None = None) -> Summary:
    """Write (or resume) this shard's targets; merge when unsharded. `backend` overrides the config's."""
    if config.chunking.merge:
        return merge(config.out)
    dataset = load_described(config.source)
    positions_by_id(dataset["id"], str(config.source))  # answers are joined to their clips by id
    pool = restrict_pool(training_pool(config.pool), config.fields)
    pool_name = config.pool if isinstance(config.pool, str) else "custom"
    items = target_items(row_fields(dataset), pool, config.seed, config.prompts_per_clip)
    labels = config.kind == "labels"
    no_llm = {"model": None, "backend": None} if labels else {}
    job = config.chunking.job(config.out, {"stage": "targets", **job_settings(config), **no_llm,
                                           "source": str(config.source), "pool_prompts": _stored_pool(pool),
                                           "pool_name": pool_name, "source_fingerprint": source_fingerprint(dataset),
                                           "inputs": len(items)},
                              total=len(items), not_compared=("source",))
    todo = job.todo()
    gold = None
    if labels:
        gold = dataset.select_columns([c for c in GOLD_COLUMNS if c in dataset.column_names]).to_list()
    else:
        backend = backend or (config.generation.backend(config.seed) if todo else None)
    descriptions, ids = dataset["description"], dataset["id"]
    bar = tqdm(total=sum(len(job.rows_of(c)) for c in todo), unit="prompt", disable=not config.progress,
               desc=f"targets shard {config.chunking.shard_index}/{config.chunking.num_shards}")
    started, tokens, done = time.perf_counter(), 0, 0
    per_call = config.chunking.chunk_size if labels else prompts_per_call(config, backend)
    for group in call_groups(todo, [len(job.rows_of(c)) for c in todo], per_call):
        answers: list[Generation] = []
        if not labels:  # one call for the group's chunks; greedy answers do not depend on how prompts are batched
            answers = backend.generate([text_turn(descriptions[r], p, config.system_prompt)
                                        for chunk in group for r, p in (items[i] for i in job.rows_of(chunk))],
                                       config.chunk_sampling(group[0]))
        for chunk in group:
            tokens, done = _write_chunk(config, job, chunk, [items[i] for i in job.rows_of(chunk)], answers, backend,
                                        gold, ids, pool_name, tokens, done, pool)
            elapsed = time.perf_counter() - started
            bar.update(len(job.rows_of(chunk)))
            bar.set_postfix(rows_per_s=f"{done / elapsed:.2f}", tokens_per_s=f"{tokens / elapsed:.1f}")
    bar.close()
    if config.chunking.num_shards == 1:
        return _merge(job, dataset)
    return job.shard_summary("targets", len(todo))


def prompts_per_call(config: TargetsConfig, backend: Backend) -> int:
    """Prompts handed to the backend at once: one chunk when sampling (a resumed chunk samples the same), else
    prompts_per_call, else what the backend asks for (vLLM and continuous batching: thousands), else enough for
    about four batches of a token budget, else one chunk."""
    chunk_size = config.chunking.chunk_size
    if config.sampling.temperature > 0:
        return chunk_size
    if config.generation.prompts_per_call:
        return config.generation.prompts_per_call
    if getattr(backend, "prompts_per_call", None):
        return max(chunk_size, backend.prompts_per_call)
    budget = getattr(backend, "token_budget", None)
    return max(chunk_size, 4 * budget // config.sampling.max_new_tokens) if budget else chunk_size


def call_groups(chunks: list[int], sizes: list[int], per_call: int) -> list[list[int]]:
    """Consecutive chunks grouped until each group holds at least `per_call` prompts (the last may hold fewer).

    >>> call_groups([0, 1, 2, 3, 4], [128, 128, 128, 128, 40], per_call=256)
    [[0, 1], [2, 3], [4]]
    """
    groups: list[list[int]] = []
    held = per_call
    for chunk, size in zip(chunks, sizes, strict=True):
        if held >= per_call:
            groups.append([])
            held = 0
        groups[-1].append(chunk)
        held += size
    return groups


def _write_chunk(config: TargetsConfig, job: ChunkedJob, chunk: int, chunk_items: list[tuple[int, str]],
                 answers: list[Generation], backend: Backend | None, gold: list[dict] | None, ids: list[str],
                 pool_name: str, tokens: int, done: int, pool: Pool | None = None) -> tuple[int, int]:
    """Flag and write one chunk's answers (its slice of the group's `answers`, or label targets from `gold`);
    returns the running counts of tokens and prompts."""
    settings = config.chunk_sampling(chunk)  # seeded per chunk: a resumed chunk samples the same
    if gold is not None:
        generator = json.dumps({"backend": "labels", "template": "label_response"}, sort_keys=True)
        generations = [Generation(label_answer(gold[r], prompt_category(pool or {}, p)), "stop", 0)
                       for r, p in chunk_items]
    else:
        generator = json.dumps({"model": backend.model_id, "backend": backend.name, **settings.as_dict(),
                                "seed": config.seed}, sort_keys=True)
        generations = answers[: len(chunk_items)]
        del answers[: len(chunk_items)]  # the group's answers are consumed chunk by chunk, in order
    rows, rejects = [], []
    for (row, prompt), generation in zip(chunk_items, generations, strict=True):
        tokens += generation.completion_tokens
        if config.trim_cut_off:
            generation = trim_to_sentence(generation)
        reason = flag(generation, config.sampling.max_new_tokens, config.refusal_patterns)
        record = {"id": ids[row], "prompt": prompt, "prompt_pool": pool_name,
                  "system_prompt": config.system_prompt or "", "response": generation.text,
                  "generator": generator}
        if reason and not config.keep_flagged:
            rejects.append({"id": ids[row], "prompt": prompt, "reason": reason, "response": generation.text})
            continue
        rows.append({**record, "flag": reason or ""} if config.keep_flagged else record)
    job.write(chunk, rows, rejects)
    return tokens, done + len(chunk_items)


def merge(out: str | os.PathLike) -> Summary:
    """Join every shard's answers into OUT/dataset and OUT/rejects.jsonl, once the described dataset is
    checked to be the one the shards read."""
    job = ChunkedJob.open(out)
    dataset = load_described(job.job["source"])
    found = source_fingerprint(dataset)
    if found != job.job["source_fingerprint"]:
        raise stale_error(job.out, [f"source_fingerprint: {job.job['source_fingerprint'][:12]}... -> "
                                    f"{found[:12]}..."])
    return _merge(job, dataset)


def _merge(job: ChunkedJob, dataset: Dataset) -> Summary:
    """The merge itself: every (clip id, prompt) once among answers and rejects, answers joined by clip id."""
    rows, rejects = job.collect()
    ids = dataset["id"]
    expected = target_items(row_fields(dataset), job.job["pool_prompts"], job.job["seed"],
                            job.job["prompts_per_clip"])
    check_accounted(job.out, [(ids[row], prompt) for row, prompt in expected],
                    [(r["id"], r["prompt"]) for r in rows + rejects])
    job.save_merged(dataset, rows, rejects)
    summary = {"inputs": job.total, "kept": len(rows), "rejected": len(rejects),
               "reasons": dict(Counter(r["reason"].split(" (")[0].split(":")[0] for r in rejects))}
    assert summary["kept"] + summary["rejected"] == job.total, summary  # no prompt lost or doubled
    return job.write_summary(summary, f"prompts {job.total} = kept {len(rows)} + rejected {len(rejects)} "
                                      f"{summary['reasons'] or ''}")
