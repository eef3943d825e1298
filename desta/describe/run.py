"""Stage 1, describe: audio corpus -> rich text descriptions (transcript + paralinguistic attributes).

Reads a manifest (JSONL/CSV with a path column, one record per line, paths relative to it and
kept inside its folder), a `datasets` folder (`save_to_disk`), a Hub dataset id, or a lhotse
corpus (a CutSet manifest or a `lhotse prepare` folder: supervisions map onto the attributes). Writes
OUT/dataset (a `datasets` dataset: the source rows plus id, duration, transcript, attributes,
sources, description), OUT/rejects.jsonl (id, source, reason) and OUT/summary.json. A row that
cannot be used (a malformed line, a duplicate id, a clip too short or too long, ...) becomes a
reject with its reason and the run goes on; inputs = described + rejected always holds. Work goes
in chunks written atomically under OUT/parts, so a killed run resumes where it stopped, and shards
(`num_shards`, `shard_index`) split it across machines; a rerun into the same OUT must have the
same source content and settings (or `overwrite`).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm import tqdm

from desta.audio import SAMPLE_RATE, WINDOW_SECONDS, AudioError, load_audio_ref
from desta.core.args import raise_problems
from desta.core.chunks import (
    ChunkedJob,
    ChunkingSection,
    check_accounted,
    differences,
    job_settings,
    read_jsonl,
    stale_error,
    to_jsonl,
    write_atomic,
)
from desta.core.digests import content_fingerprint
from desta.core.summary import Summary
from desta.describe.attributes import (
    LabelError,
    count_words,
    measure,
    noise_word,
    normalize_label,
    pitch_word,
    speed_word,
    volume_word,
)
from desta.describe.description import DESCRIPTION_NAMES, format_description
from desta.describe.sources import LABEL_ATTRIBUTES, load_mapping, open_source

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import Pipeline

    from desta.audio.asr import Transcriber

DEFAULT_ATTRIBUTES = ["gender", "emotion", "accent", "age", "pitch", "volume", "speaking_speed", "duration"]
LOAD_REJECTS = "load-rejects.jsonl"  # OUT/parts/: the rows the source could not give, found before any chunk
# Besides the chunking section and desta.core.chunks.RUN_ONLY: the throughput settings of decoding and ASR.
THROUGHPUT = ("num_proc", "asr_batch_size")
# Settings that moved into the shared chunking section (desta.core.chunks): an old key is refused with its new place.
MOVED = {name: f"chunking.{name}" for name in ("chunk_size", "num_shards", "shard_index", "merge", "overwrite")}


@dataclass
class DescribeConfig:
    """Turn an audio corpus into DeSTA descriptions (transcript + attributes); bad rows go to rejects."""

    MOVED = MOVED

    source: str = ""
    """manifest (.jsonl/.csv), save_to_disk folder, Hub dataset id, lhotse cuts or `lhotse prepare` folder"""
    out: str = ""
    """output folder"""
    mapping: str | None = None
    """corpus mapping: a name in data_prep/ (vctk, cremad, ...) or a YAML path"""
    split: str = "train"
    """split of a Hub dataset or a DatasetDict folder"""
    attributes: list[str] = field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    """what descriptions show, in this order"""
    asr_model: str | None = None
    """Whisper checkpoint for clips whose metadata has no transcript"""
    asr_backend: Literal["transformers", "openai-whisper", "faster-whisper"] = "transformers"
    """speech recognition backend"""
    asr_batch_size: int = 16
    """30 s windows per Whisper batch"""
    asr_vad: bool = True
    """transcribe only windows where Silero VAD finds speech (the others get no transcript, as in DeSTA2.5)"""
    classifiers: dict[str, str] = field(default_factory=dict)
    """audio-classification model per label the metadata lacks, e.g. emotion=MODEL"""
    max_seconds: float = 600.0
    """longer clips are rejected"""
    min_seconds: float = 0.3
    """shorter clips are rejected: too short for a transcript, a pitch or a speaking speed"""
    allow_absolute_paths: bool = False
    """manifest paths may lead outside the manifest's folder (absolute paths, ../)"""
    chunking: ChunkingSection = field(default_factory=lambda: ChunkingSection(chunk_size=256))
    num_proc: int = 1
    """worker processes for decoding and signal attributes"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        problems = []
        if not self.out:
            problems.append(("out", "required: the output folder"))
        if not self.source and not self.chunking.merge:
            problems.append(("source", "required: a manifest (.jsonl/.csv), a save_to_disk folder or a Hub dataset "
                                       "id (or chunking.merge)"))
        unknown = sorted(set(self.attributes) - set(DESCRIPTION_NAMES))
        if unknown:
            problems.append(("attributes", f"unknown {unknown}; choose from {sorted(DESCRIPTION_NAMES)}"))
        if set(self.classifiers) - set(LABEL_ATTRIBUTES):
            problems.append(("classifiers", f"can fill {list(LABEL_ATTRIBUTES)}, not {sorted(set(self.classifiers))}"))
        if self.num_proc < 1 or self.asr_batch_size < 1:
            problems.append(("num_proc", "num_proc and asr_batch_size must be at least 1"))
        if not self.max_seconds > 0:
            problems.append(("max_seconds", f"must be positive, got {self.max_seconds}"))
        if not 0 <= self.min_seconds < self.max_seconds:
            problems.append(("min_seconds", f"must be in [0, max_seconds {self.max_seconds}), got {self.min_seconds}"))
        raise_problems(problems)


# ----- one row -----

def analyse_row(row: dict, mapping: dict[str, Any], max_seconds: float, classified: tuple[str, ...] = (),
                min_seconds: float = 0.0) -> dict:
    """Decode, validate and measure one row; label attributes from metadata. Never raises for bad input:
    returns {"reject": reason} instead. Samples are kept when a model must still fill the transcript
    or one of the `classified` attributes."""
    audio = row["audio"] or {}
    name = audio.get("path") or ("audio bytes" if audio.get("bytes") else "missing path")
    try:
        samples = load_audio_ref(audio, name=name)
    except AudioError as err:
        return {"reject": str(err), "source": name}
    duration = len(samples) / SAMPLE_RATE
    if duration > max_seconds:
        return {"reject": f"{name}: too long ({duration:.0f} s > max_seconds {max_seconds:.0f} s); "
                          "split it or raise max_seconds", "source": name}
    if duration < min_seconds:
        return {"reject": f"{name}: too short ({duration:.2f} s < min_seconds {min_seconds:g} s); too short to "
                          "describe: drop it or lower min_seconds", "source": name}
    result: dict[str, Any] = {"source": name, "sources": {}}
    labels = mapping.get("labels", {})
    for attribute in LABEL_ATTRIBUTES:
        column = mapping.get(attribute, attribute)
        value = row.get(column) if column else None
        try:
            result[attribute] = normalize_label(attribute, value, labels.get(attribute))
        except LabelError as err:
            return {"reject": f"column {column!r}: {err}", "source": name}
        if result[attribute] is not None:
            result["sources"][attribute] = "metadata"
    transcript_column = mapping.get("transcript", "transcript")
    transcript = row.get(transcript_column) if transcript_column else None
    result["transcript"] = str(transcript).strip() if transcript not in (None, "") else None
    if result["transcript"] is not None:
        result["sources"]["transcript"] = "metadata"
    measures = measure(samples)
    result.update(duration=duration, f0_hz=measures.f0_hz, level_dbfs=measures.level_dbfs,
                  snr_db=measures.snr_db, active_seconds=measures.active_seconds)
    result["pitch"] = pitch_word(measures.f0_hz, result["gender"])
    result["volume"] = volume_word(measures.level_dbfs)
    result["noise"] = noise_word(measures.snr_db)
    result["sources"].update(duration="signal", pitch="signal", volume="signal", noise="signal")
    if result["transcript"] is None or any(result[a] is None for a in classified):
        result["samples"] = samples  # kept for the batched model passes
    return result


def _analyse_job(job: tuple[dict, dict, float, tuple[str, ...], float]) -> dict:
    return analyse_row(*job)


def finish_row(result: dict, shown: list[str]) -> dict:
    """Speaking speed and description once the transcript is known; the row as stored."""
    words = count_words(result["transcript"])
    wps = words / result["active_seconds"] if result["active_seconds"] > 0 else 0.0
    attributes = {name: result.get(name) for name in LABEL_ATTRIBUTES + ("pitch", "volume", "noise")}
    attributes["speaking_speed"] = speed_word(wps)
    attributes["duration"] = f"{max(1, round(result['duration']))}s"
    segments = result.get("segments") or [(0.0, result["duration"], result["transcript"])]
    sources = {**result["sources"], "speaking_speed": "signal"}
    return {
        "duration": round(result["duration"], 3), "transcript": result["transcript"],
        **{name: attributes[name] for name in LABEL_ATTRIBUTES},
        "pitch": attributes["pitch"], "volume": attributes["volume"], "speaking_speed": attributes["speaking_speed"],
        "noise": attributes["noise"], "f0_hz": None if result["f0_hz"] is None else round(result["f0_hz"], 1),
        "level_dbfs": round(result["level_dbfs"], 1), "words_per_second": round(wps, 2),
        "snr_db": round(result["snr_db"], 1), "sources": json.dumps(sources, sort_keys=True),
        "description": format_description(segments, attributes, shown),
    }


# ----- the stage -----

def _classify_pending(results: list[dict], attribute: str, classifier: Pipeline) -> None:
    """Fill a missing label attribute with an audio-classification pipeline's top label."""
    from desta.audio import SAMPLE_RATE as RATE

    pending = [r for r in results if "samples" in r and r.get(attribute) is None and "reject" not in r]
    if not pending:
        return
    predictions = classifier([{"raw": r["samples"], "sampling_rate": RATE} for r in pending], top_k=1)
    for result, prediction in zip(pending, predictions, strict=True):
        label = prediction[0]["label"]
        try:
            result[attribute] = normalize_label(attribute, label)
        except LabelError as err:
            result["reject"] = f"{attribute} classifier: {err}"
            continue
        result["sources"][attribute] = "model"
        if attribute == "gender":
            result["pitch"] = pitch_word(result["f0_hz"], result["gender"])


def _transcribe_pending(results: list[dict], transcriber: Transcriber) -> None:
    """Fill missing transcripts with the ASR model, batched; long clips get one segment per 30 s window."""
    from desta.audio import split_windows

    pending = [r for r in results if "samples" in r and r["transcript"] is None and "reject" not in r]
    if not pending:
        return
    windows = [split_windows(r["samples"]) for r in pending]
    texts = iter(transcriber([w for clip in windows for w in clip]))
    for result, clip_windows in zip(pending, windows, strict=True):
        pieces = [next(texts) for _ in clip_windows]
        result["transcript"] = " ".join(p for p in pieces if p).strip()
        result["sources"]["transcript"] = "model"
        if len(clip_windows) > 1:
            result["segments"] = [(i * WINDOW_SECONDS, min((i + 1) * WINDOW_SECONDS, result["duration"]), text)
                                  for i, text in enumerate(pieces)]


def describe(config: DescribeConfig) -> Summary:
    """Run (or resume) this shard's chunks; merge when the run is unsharded. Returns the counts."""
    if config.chunking.merge:
        return merge(config.out)
    out = Path(config.out)
    mapping = load_mapping(config.mapping)
    dataset, load_rejects = open_source(config.source, mapping, config.split, config.allow_absolute_paths)
    job = config.chunking.job(out, {"stage": "describe", **job_settings(config, THROUGHPUT), "mapping_content": mapping,
                                    "source_fingerprint": content_fingerprint(dataset, extra=load_rejects),
                                    "load_rejects": len(load_rejects)},
                              total=len(dataset), not_compared=("source",))
    write_atomic(job.parts / LOAD_REJECTS, to_jsonl(load_rejects))
    todo = job.todo()
    transcriber = None
    classifiers = {}
    for attribute, model in config.classifiers.items():
        from transformers import pipeline

        classifiers[attribute] = pipeline("audio-classification", model=model)
    started, audio_seconds, done_rows = time.perf_counter(), 0.0, 0
    bar = tqdm(total=sum(len(job.rows_of(c)) for c in todo), unit="clip", disable=not config.progress,
               desc=f"describe shard {config.chunking.shard_index}/{config.chunking.num_shards}")
    pool = ProcessPoolExecutor(config.num_proc) if config.num_proc > 1 else None
    try:
        for chunk in todo:
            indices = job.rows_of(chunk)
            described, rejected, transcriber = _describe_chunk(config, dataset.select(indices), mapping, classifiers,
                                                               pool, transcriber)
            job.write(chunk, described, rejected)
            audio_seconds += sum(row["duration"] for row in described)
            done_rows += len(indices)
            elapsed = time.perf_counter() - started
            bar.update(len(indices))
            bar.set_postfix(clips_per_s=f"{done_rows / elapsed:.1f}", rtf=f"{audio_seconds / elapsed:.0f}x")
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    if config.chunking.num_shards == 1:
        return _merge(job, dataset)
    return job.shard_summary("describe", len(todo))


def _describe_chunk(config: DescribeConfig, rows: Dataset, mapping: dict[str, Any], classifiers: dict[str, Pipeline],
                    pool: ProcessPoolExecutor | None, transcriber: Transcriber | None
                    ) -> tuple[list[dict], list[dict], Transcriber | None]:
    """One chunk's rows, described or rejected with the reason; and the transcriber, made when a row first needs
    one (a transcript the metadata lacks)."""
    jobs = [(dict(row), mapping, config.max_seconds, tuple(classifiers), config.min_seconds) for row in rows]
    results = list(pool.map(_analyse_job, jobs, chunksize=8)) if pool else [analyse_row(*j) for j in jobs]
    for attribute, classifier in classifiers.items():
        _classify_pending(results, attribute, classifier)
    needs_asr = [r for r in results if "samples" in r and r["transcript"] is None and "reject" not in r]
    if needs_asr and config.asr_model is None:
        for r in needs_asr:
            r["reject"] = "no transcript in the metadata and no --asr-model to transcribe it"
    elif needs_asr:
        if transcriber is None:
            from desta.audio.asr import make_transcriber

            transcriber = make_transcriber(config.asr_backend, config.asr_model, batch_size=config.asr_batch_size,
                                           vad=config.asr_vad)
        _transcribe_pending(results, transcriber)
    described, rejected = [], []
    for row, result in zip(rows, results, strict=True):
        result.pop("samples", None)
        if "reject" in result:
            rejected.append({"id": row["id"], "source": result["source"], "reason": result["reject"]})
        else:
            described.append({"id": row["id"], **finish_row(result, config.attributes)})
    return described, rejected, transcriber


def merge(out: str | os.PathLike) -> Summary:
    """Join every shard's parts into OUT/dataset and OUT/rejects.jsonl; checks that no chunk is missing and
    that the source still holds what the shards described."""
    job = ChunkedJob.open(out)
    mapping = load_mapping(job.job["mapping"])
    dataset, load_rejects = open_source(job.job["source"], mapping, job.job["split"], job.job["allow_absolute_paths"])
    now = {"mapping_content": json.loads(json.dumps(mapping)),
           "source_fingerprint": content_fingerprint(dataset, extra=load_rejects)}
    changed = differences({key: job.job[key] for key in now}, now)
    if changed:
        raise stale_error(job.out, changed)
    return _merge(job, dataset)


def _merge(job: ChunkedJob, dataset: Dataset) -> Summary:
    """The merge itself, on the source the parts were made from: rows are matched to source rows by id."""
    described, rejects = job.collect()
    check_accounted(job.out, dataset["id"], [row["id"] for row in described + rejects])
    load_rejects = read_jsonl(job.parts / LOAD_REJECTS)
    rejects = load_rejects + rejects
    selected = job.save_merged(dataset, described, rejects)
    inputs = job.total + job.job["load_rejects"]
    summary = {"inputs": inputs, "described": len(described), "rejected": len(rejects),
               "duplicate_ids": sum("duplicate id" in r["reason"] for r in load_rejects),
               "hours": round(sum(selected["duration"]) / 3600, 4) if len(selected) else 0.0}
    assert summary["described"] + summary["rejected"] == inputs, summary  # no row lost or doubled
    return job.write_summary(summary, f"inputs {inputs} = described {summary['described']} + rejected "
                                      f"{summary['rejected']} ({summary['hours']} h described)")
