"""Stage 2, targets (self-output): the text LLM answers an instruction from each description.

Reads a described dataset (OUT/dataset of `desta describe`). Writes OUT/dataset: the same rows,
one per (clip, prompt), plus `prompt`, `prompt_pool`, `response` and `generator` (model id,
backend, sampling settings as JSON); OUT/rejects.jsonl for answers the quality filter flags
(empty, cut off, looping, ignoring the audio), each with its reason; OUT/summary.json. Chunks
make it resumable and shardable like describe.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from desta.chunks import ChunkedJob, attach_columns, save_dataset_atomic, to_jsonl, write_atomic
from desta.generation import Backend, Conversation, Generation, SamplingSettings, make_backend
from desta.prompts import DEFAULT_SYSTEM_PROMPT, pick_prompts, training_pool

# Answers that show the model did not "hear" the description (case-insensitive regular expressions).
DEFAULT_REFUSAL_PATTERNS = [
    r"\bI (?:cannot|can't|can ?not|am unable to|'m unable to|do not|don't) (?:hear|listen|access|play|process)\b",
    r"\b(?:do not|don't|cannot|can't) have (?:the ability|access) to (?:hear|listen|audio|play)",
    r"\bas an? (?:AI|text-based|(?:large )?language)(?: language)? (?:model|assistant)\b",
    r"\bno audio (?:was|is|has been) (?:provided|attached|shared)\b",
    r"\b(?:cannot|can't|unable to) (?:hear|listen to|access|play) (?:the |this |any )?(?:audio|recording|clip)\b",
]
REPETITION_COMPRESSION = 2.4  # like Whisper: text that gzip shrinks more than 2.4x is looping
REPETITION_MIN_CHARS = 80  # shorter answers are too short for the compression test
REPEATED_NGRAM = (3, 4)  # ... or the same 3 words 4 times in a row


@dataclass
class TargetsConfig:
    """Settings of `desta targets`."""

    source: str  # a described dataset folder (OUT/dataset of desta describe)
    out: str  # output folder
    model: str  # the LLM (Hub id or folder; the served model name for the http backend)
    backend: str = "transformers"  # transformers | vllm | http
    base_url: str | None = None  # http backend: e.g. http://127.0.0.1:8000/v1
    pool: str | list[str] = "desta2"  # prompt pool name (desta2, desta25) or a list of prompts
    prompts_per_clip: int = 1  # distinct prompts per clip: one output row each
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # None: no system turn
    max_new_tokens: int = 256  # longer answers are cut and flagged
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling mass (with temperature > 0)
    repetition_penalty: float = 1.0  # >1 discourages repeats
    seed: int = 0  # prompts and sampling depend only on it (and the row)
    batch_size: int = 16  # prompts per generate call (transformers)
    concurrency: int = 8  # requests in flight (http)
    timeout: float = 120.0  # seconds per request (http)
    max_retries: int = 4  # per request (http)
    chunk_size: int = 128  # prompts per resumable unit of work
    num_shards: int = 1  # split the work across this many machines
    shard_index: int = 0  # this machine's shard, 0-based; merge with --merge when all are done
    refusal_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS))
    keep_flagged: bool = False  # True: flagged answers stay in the dataset with a `flag` column
    trim_cut_off: bool = False  # answers cut at max_new_tokens end at their last full sentence instead
    progress: bool = True  # show a progress bar

    def sampling(self, chunk: int = 0) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, self.repetition_penalty,
                                self.seed + chunk)


def user_turn(description: str, instruction: str) -> str:
    """The user message: the description, a blank line, the instruction.

    >>> user_turn("[00:00-00:01] Hi. (Gender: Male)", "What can you hear from the audio?")
    '[00:00-00:01] Hi. (Gender: Male)\\n\\nWhat can you hear from the audio?'
    """
    return f"{description.strip()}\n\n{instruction.strip()}"


def conversation(description: str, instruction: str, system_prompt: str | None) -> Conversation:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user_turn(description, instruction)}]


def repeated_ngram(words: list[str]) -> str | None:
    """The first 3-word sequence repeated 4 times in a row, or None.

    >>> repeated_ngram("a man speaks a man speaks a man speaks a man speaks".split())
    'a man speaks'
    """
    n, times = REPEATED_NGRAM
    for start in range(len(words) - n * times + 1):
        gram = words[start : start + n]
        if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(times)):
            return " ".join(gram)
    return None


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
    if len(text) >= REPETITION_MIN_CHARS and len(text.encode()) / len(zlib.compress(text.encode())) > \
            REPETITION_COMPRESSION:
        return f"repetition loop (compresses more than {REPETITION_COMPRESSION}x)"
    gram = repeated_ngram(re.findall(r"\w+", text.lower()))
    if gram:
        return f"repetition loop ({gram!r} {REPEATED_NGRAM[1]} times in a row)"
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


def _backend(config: TargetsConfig) -> Backend:
    if config.backend == "http":
        return make_backend("http", config.model, base_url=config.base_url, concurrency=config.concurrency,
                            timeout=config.timeout, max_retries=config.max_retries)
    if config.backend == "transformers":
        return make_backend("transformers", config.model, batch_size=config.batch_size)
    return make_backend(config.backend, config.model)


def load_described(source: str | os.PathLike):
    from datasets import load_from_disk

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found; give the dataset folder written by desta describe "
                                "(OUT/dataset)")
    dataset = load_from_disk(str(path))
    missing = [c for c in ("id", "description") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path} is not a described dataset: no column {missing} (columns: "
                         f"{dataset.column_names}); run `desta describe` first")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no rows")
    return dataset


def targets(config: TargetsConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Generate (or resume) this shard's answers; merge when unsharded. `backend` overrides config's."""
    dataset = load_described(config.source)
    pool = training_pool(config.pool)
    pool_name = config.pool if isinstance(config.pool, str) else "custom"
    items = [(row, prompt) for row in range(len(dataset))
             for prompt in pick_prompts(pool, row, config.seed, config.prompts_per_clip)]
    job = ChunkedJob(config.out, {"stage": "targets", "source": str(config.source), "model": config.model,
                                  "backend": config.backend, "pool": pool, "pool_name": pool_name,
                                  "system_prompt": config.system_prompt, "sampling": config.sampling().as_dict(),
                                  "keep_flagged": config.keep_flagged, "inputs": len(items)},
                     total=len(items), chunk_size=config.chunk_size, num_shards=config.num_shards,
                     shard_index=config.shard_index)
    todo = job.todo()
    backend = backend or (_backend(config) if todo else None)
    descriptions, ids = dataset["description"], dataset["id"]
    bar = tqdm(total=sum(len(job.rows_of(c)) for c in todo), unit="prompt", disable=not config.progress,
               desc=f"targets shard {config.shard_index}/{config.num_shards}")
    started, tokens, done = time.perf_counter(), 0, 0
    for chunk in todo:
        chunk_items = [items[i] for i in job.rows_of(chunk)]
        settings = config.sampling(chunk)  # seeded per chunk: a resumed chunk samples the same
        generator = json.dumps({"model": backend.model_id, "backend": backend.name, **settings.as_dict(),
                                "seed": config.seed}, sort_keys=True)
        generations = backend.generate([conversation(descriptions[r], p, config.system_prompt)
                                        for r, p in chunk_items], settings)
        rows, rejects = [], []
        for (row, prompt), generation in zip(chunk_items, generations, strict=True):
            tokens += generation.completion_tokens
            if config.trim_cut_off:
                generation = trim_to_sentence(generation)
            reason = flag(generation, config.max_new_tokens, config.refusal_patterns)
            record = {"_index": row, "prompt": prompt, "prompt_pool": pool_name, "response": generation.text,
                      "generator": generator}
            if reason and not config.keep_flagged:
                rejects.append({"id": ids[row], "prompt": prompt, "reason": reason, "response": generation.text})
                continue
            rows.append({**record, "flag": reason or ""} if config.keep_flagged else record)
        job.write(chunk, rows, rejects)
        done += len(chunk_items)
        elapsed = time.perf_counter() - started
        bar.update(len(chunk_items))
        bar.set_postfix(rows_per_s=f"{done / elapsed:.2f}", tokens_per_s=f"{tokens / elapsed:.1f}")
    bar.close()
    if config.num_shards == 1:
        return merge(config.out)
    return {"shard": config.shard_index, "chunks": len(job.mine()), "run_now": len(todo)}


def merge(out: str | os.PathLike) -> dict[str, Any]:
    """Join every shard's answers into OUT/dataset and OUT/rejects.jsonl."""
    job = ChunkedJob.open(out)
    rows, rejects = job.collect()
    dataset = load_described(job.job["source"])
    indices = [row.pop("_index") for row in rows]
    save_dataset_atomic(attach_columns(dataset, indices, rows), job.out / "dataset")
    write_atomic(job.out / "rejects.jsonl", to_jsonl(rejects))
    summary = {"inputs": job.total, "kept": len(rows), "rejected": len(rejects),
               "reasons": _count(r["reason"].split(" (")[0].split(":")[0] for r in rejects)}
    assert summary["kept"] + summary["rejected"] == job.total, summary  # no prompt lost or doubled
    write_atomic(job.out / "summary.json", json.dumps({**summary, "config": job.job}, indent=2))
    return summary


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts
