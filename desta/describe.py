"""Stage 1, describe: audio corpus -> rich text descriptions (transcript + paralinguistic attributes).

Reads a manifest (JSONL/CSV with a path column, paths relative to it), a `datasets` folder
(`save_to_disk`), a Hub dataset id, or a lhotse corpus (a CutSet manifest or a `lhotse prepare`
folder: supervisions map onto the attributes). Writes OUT/dataset (a `datasets` dataset: the source rows
plus id, duration, transcript, attributes, sources, description), OUT/rejects.jsonl (id, source,
reason) and OUT/summary.json. Work goes in chunks written atomically under OUT/parts, so a killed
run resumes where it stopped, and shards (`num_shards`, `shard_index`) split it across machines.
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from tqdm import tqdm

from desta.attributes import (
    LabelError,
    count_words,
    measure,
    noise_word,
    normalize_label,
    pitch_word,
    speed_word,
    volume_word,
)
from desta.audio import SAMPLE_RATE, WINDOW_SECONDS, AudioError, load_audio_ref, timestamp
from desta.core.args import raise_problems
from desta.core.artifacts import DATASET, REJECTS, SUMMARY
from desta.core.chunks import ChunkedJob, attach_columns, read_jsonl, save_dataset_atomic, to_jsonl, write_atomic

if TYPE_CHECKING:
    from datasets import Dataset
    from lhotse import CutSet
    from lhotse.cut import Cut
    from transformers import Pipeline

    from desta.asr import Transcriber

LABEL_ATTRIBUTES = ("gender", "emotion", "accent", "age")
DEFAULT_ATTRIBUTES = ["gender", "emotion", "accent", "age", "pitch", "volume", "speaking_speed", "duration"]
# How each attribute is named inside a description, in the order it appears.
DESCRIPTION_NAMES = {"gender": "Gender", "emotion": "Emotion", "accent": "Accent", "age": "Age", "pitch": "Pitch",
                     "volume": "Volume", "speaking_speed": "Speaking speed", "noise": "Noise",
                     "duration": "Duration"}
MAPPINGS_DIR = Path(__file__).resolve().parent.parent / "data_prep"


@dataclass
class DescribeConfig:
    """Turn an audio corpus into DeSTA descriptions (transcript + attributes); bad rows go to rejects."""

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
    classifiers: dict[str, str] = field(default_factory=dict)
    """audio-classification model per label the metadata lacks, e.g. emotion=MODEL"""
    max_seconds: float = 600.0
    """longer clips are rejected"""
    chunk_size: int = 256
    """rows per resumable unit of work"""
    num_shards: int = 1
    """split the work across this many machines"""
    shard_index: int = 0
    """this machine's shard, 0-based; merge when all are done"""
    num_proc: int = 1
    """worker processes for decoding and signal attributes"""
    merge: bool = False
    """only join the finished shards in `out`"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        problems = []
        if not self.out:
            problems.append(("out", "required: the output folder"))
        if not self.source and not self.merge:
            problems.append(("source", "required: a manifest (.jsonl/.csv), a save_to_disk folder or a Hub dataset "
                                       "id (or merge)"))
        unknown = sorted(set(self.attributes) - set(DESCRIPTION_NAMES))
        if unknown:
            problems.append(("attributes", f"unknown {unknown}; choose from {sorted(DESCRIPTION_NAMES)}"))
        if set(self.classifiers) - set(LABEL_ATTRIBUTES):
            problems.append(("classifiers", f"can fill {list(LABEL_ATTRIBUTES)}, not {sorted(set(self.classifiers))}"))
        if not 0 <= self.shard_index < self.num_shards:
            problems.append(("shard_index", f"must be in [0, {self.num_shards - 1}], got {self.shard_index}"))
        if self.chunk_size < 1 or self.num_proc < 1 or self.asr_batch_size < 1:
            problems.append(("chunk_size", "chunk_size, num_proc and asr_batch_size must be at least 1"))
        if not self.max_seconds > 0:
            problems.append(("max_seconds", f"must be positive, got {self.max_seconds}"))
        raise_problems(problems)


# ----- corpus mappings -----

def load_mapping(name_or_path: str | None) -> dict[str, Any]:
    """A corpus mapping: which column holds id, audio, transcript and each label, and label spellings."""
    if name_or_path is None:
        return {}
    path = Path(name_or_path)
    if not path.is_file():
        path = MAPPINGS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MAPPINGS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"corpus mapping {name_or_path!r} not found; give a YAML path or one of {known}")
    mapping = yaml.safe_load(path.read_text()) or {}
    allowed = {"id", "audio", "transcript", "speaker", "labels", *LABEL_ATTRIBUTES}
    if set(mapping) - allowed:
        raise ValueError(f"{path}: unknown keys {sorted(set(mapping) - allowed)}; allowed: {sorted(allowed)}")
    return mapping


# ----- sources -----

def _read_manifest(path: Path) -> tuple[list[dict], list[dict]]:
    """Rows of a JSONL or CSV manifest, with paths made absolute; malformed rows come back as rejects."""
    rows, rejects = [], []
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            records = [(i + 2, r, None) for i, r in enumerate(csv.DictReader(handle))]  # line 1 is the header
    else:
        records = []
        for line_no, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.append((line_no, record, None if isinstance(record, dict) else "not a JSON object"))
            except json.JSONDecodeError as err:
                records.append((line_no, None, f"malformed JSON: {err.msg}"))
    for line_no, record, problem in records:
        where = f"{path.name}:{line_no}"
        if problem is None and not (record.get("path") or record.get("audio")):
            problem = "no 'path' column value"
        if problem:
            rejects.append({"id": (record or {}).get("id") or where, "source": where, "reason": problem})
            continue
        audio_path = Path(str(record.get("path") or record.get("audio")))
        record = {k: (None if v is None else str(v)) for k, v in record.items() if k not in ("path", "audio")}
        record["audio"] = {"path": str(audio_path if audio_path.is_absolute() else path.parent / audio_path),
                           "bytes": None}
        record.setdefault("id", audio_path.stem)
        rows.append(record)
    return rows, rejects


def open_source(source: str, mapping: dict[str, Any], split: str = "train") -> tuple[Dataset, list[dict]]:
    """The source as a `datasets.Dataset` with an undecoded `audio` column and an `id` column, plus rejects."""
    from datasets import Audio, Dataset, load_dataset, load_from_disk

    path = Path(source)
    rejects: list[dict] = []
    if is_lhotse_manifest(path):
        dataset, rejects = lhotse_source(path, split)
    elif path.is_file() and path.suffix in (".jsonl", ".json", ".csv"):
        rows, rejects = _read_manifest(path)
        if not rows and not rejects:
            raise ValueError(f"{path} holds no rows; a manifest needs one row per clip with a 'path' column")
        dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"id": [], "audio": []})
    elif path.is_dir():
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict
            if split not in dataset:
                raise ValueError(f"{path} has splits {sorted(dataset)}, not {split!r}; pass --split")
            dataset = dataset[split]
    elif path.exists():
        raise ValueError(f"{path}: unsupported source; give a .jsonl/.csv manifest or a save_to_disk folder")
    else:
        dataset = load_dataset(source, split=split)
    audio_column = mapping.get("audio", "audio")
    if audio_column not in dataset.column_names:
        raise ValueError(f"{source}: no audio column {audio_column!r} (columns: {dataset.column_names}); "
                         "set 'audio' in the corpus mapping")
    if audio_column != "audio":
        dataset = dataset.rename_column(audio_column, "audio")
    if len(dataset):
        dataset = dataset.cast_column("audio", Audio(decode=False))
    id_column = mapping.get("id", "id")
    if id_column in dataset.column_names and id_column != "id":
        dataset = dataset.add_column("id", [str(v) for v in dataset[id_column]]) \
            if "id" not in dataset.column_names else dataset
    if "id" not in dataset.column_names:
        dataset = dataset.add_column("id", [f"row-{i:08d}" for i in range(len(dataset))])
    return dataset, rejects


def is_lhotse_manifest(path: Path) -> bool:
    """Whether `path` is a lhotse CutSet manifest (cuts.jsonl[.gz]) or a `lhotse prepare` output folder
    (*_recordings_*.jsonl.gz beside *_supervisions_*.jsonl.gz)."""
    if path.is_dir():
        return any(path.glob("*recordings*.jsonl*")) and any(path.glob("*supervisions*.jsonl*"))
    if not (path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz"))):
        return False
    import gzip

    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "recording" in record and "supervisions" in record


def _lhotse_cuts(path: Path, split: str) -> CutSet:
    """The CutSet of a cuts manifest, or of a `lhotse prepare` folder's recordings and supervisions for one
    part (`split`, e.g. dev-clean; the only part when there is one)."""
    from lhotse import CutSet, load_manifest

    if path.is_file():
        return CutSet.from_file(path)
    parts = {p.name.split("_recordings_")[-1].split(".jsonl")[0]: p for p in path.glob("*_recordings_*.jsonl*")}
    if split not in parts and len(parts) != 1:
        raise ValueError(f"{path} holds lhotse manifests for parts {sorted(parts)}, not {split!r}; pass --split")
    part = split if split in parts else next(iter(parts))
    supervisions = sorted(path.glob(f"*_supervisions_{part}.jsonl*"))
    if not supervisions:
        raise ValueError(f"{path}: no supervisions manifest for part {part!r} beside {parts[part].name}")
    return CutSet.from_manifests(recordings=load_manifest(parts[part]), supervisions=load_manifest(supervisions[0]))


def _lhotse_audio(cut: Cut) -> dict:
    """The cut's audio as a `datasets` Audio value: the file itself when the cut is a whole one-channel file,
    else the cut's samples as FLAC bytes (a segment of a longer recording, several sources, transforms)."""
    import io

    import numpy as np
    import soundfile as sf

    recording = cut.recording
    whole = (len(recording.sources) == 1 and recording.sources[0].type == "file" and not recording.transforms
             and recording.num_channels == 1 and cut.start == 0 and abs(cut.duration - recording.duration) < 1e-3)
    if whole:
        return {"path": str(recording.sources[0].source), "bytes": None}
    samples = np.asarray(cut.load_audio(), dtype=np.float32)  # (channels, samples)
    buffer = io.BytesIO()
    sf.write(buffer, samples.mean(axis=0), cut.sampling_rate, format="FLAC")
    return {"path": None, "bytes": buffer.getvalue()}


def lhotse_source(path: Path, split: str = "train") -> tuple[Dataset, list[dict]]:
    """A lhotse corpus as rows: one per supervision (cuts holding several are trimmed to each), with the
    supervision's text as `transcript` and its speaker, gender, language and custom fields (emotion, age,
    accent, ...) as columns of the same names, so desta's attributes read them without a mapping. A cut
    whose audio cannot be read is a reject."""
    from datasets import Dataset

    cuts = _lhotse_cuts(path, split)
    rows, rejects = [], []
    for cut in cuts:
        for piece in (cut.trim_to_supervisions(keep_overlapping=False) if len(cut.supervisions) > 1 else [cut]):
            try:
                audio = _lhotse_audio(piece)
            except Exception as err:  # lhotse raises many kinds for a missing or unreadable file
                rejects.append({"id": piece.id, "source": str(path), "reason": "lhotse cannot read the audio: "
                                + str(err).splitlines()[0]})
                continue
            supervision = piece.supervisions[0] if piece.supervisions else None
            row = {"id": piece.id, "audio": audio, "transcript": None}
            if supervision is not None:
                fields = {"transcript": supervision.text, "speaker": supervision.speaker,
                          "gender": supervision.gender, "language": supervision.language, **(supervision.custom or {})}
                row.update({k: None if v is None else str(v) for k, v in fields.items()})
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    dataset = Dataset.from_list([{c: row.get(c) for c in columns} for row in rows]) if rows else \
        Dataset.from_dict({"id": [], "audio": []})
    return dataset, rejects


# ----- one row -----

def analyse_row(row: dict, mapping: dict[str, Any], max_seconds: float, classified: tuple[str, ...] = ()) -> dict:
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


def _analyse_job(job: tuple[dict, dict, float]) -> dict:
    return analyse_row(*job)


def format_description(segments: list[tuple[float, float, str]], attributes: dict[str, str | None],
                       shown: list[str]) -> str:
    """The DeSTA2.5 description: one line per segment, attributes in brackets.

    >>> format_description([(0.0, 2.2, "Excuse me?")], {"gender": "Female", "emotion": "Neutral",
    ...     "accent": "British", "pitch": "High", "volume": "Low", "speaking_speed": "Slow", "duration": "2s"},
    ...     ["gender", "emotion", "accent", "pitch", "volume", "speaking_speed", "duration"])
    '[00:00-00:02] Excuse me? (Gender: Female, Emotion: Neutral, Accent: British, Pitch: High, Volume: Low, \
Speaking speed: Slow, Duration: 2s)'
    """
    order = [name for name in DESCRIPTION_NAMES if name in shown and attributes.get(name)]
    brackets = ", ".join(f"{DESCRIPTION_NAMES[name]}: {attributes[name]}" for name in order)
    lines = []
    for start, end, text in segments:
        lines.append(f"[{timestamp(start)}-{timestamp(end)}] {text}" + (f" ({brackets})" if brackets else ""))
    return "\n".join(lines)


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


def describe(config: DescribeConfig) -> dict[str, Any]:
    """Run (or resume) this shard's chunks; merge when the run is unsharded. Returns the counts."""
    if config.merge:
        return merge(config.out)
    out = Path(config.out)
    mapping = load_mapping(config.mapping)
    dataset, load_rejects = open_source(config.source, mapping, config.split)
    job = ChunkedJob(out, {"stage": "describe", "source": config.source, "mapping": config.mapping,
                           "split": config.split, "attributes": config.attributes, "classifiers": config.classifiers,
                           "load_rejects": len(load_rejects)},
                     total=len(dataset), chunk_size=config.chunk_size, num_shards=config.num_shards,
                     shard_index=config.shard_index)
    write_atomic(job.parts / "load-rejects.jsonl", to_jsonl(load_rejects))
    todo = job.todo()
    transcriber = None
    classifiers = {}
    for attribute, model in config.classifiers.items():
        from transformers import pipeline

        classifiers[attribute] = pipeline("audio-classification", model=model)
    started, audio_seconds, done_rows = time.perf_counter(), 0.0, 0
    bar = tqdm(total=sum(len(job.rows_of(c)) for c in todo), unit="clip", disable=not config.progress,
               desc=f"describe shard {config.shard_index}/{config.num_shards}")
    pool = ProcessPoolExecutor(config.num_proc) if config.num_proc > 1 else None
    try:
        for chunk in todo:
            indices = job.rows_of(chunk)
            rows = dataset.select(indices)
            jobs = [(dict(row), mapping, config.max_seconds, tuple(classifiers)) for row in rows]
            results = list(pool.map(_analyse_job, jobs, chunksize=8)) if pool else [analyse_row(*j) for j in jobs]
            for attribute, classifier in classifiers.items():
                _classify_pending(results, attribute, classifier)
            needs_asr = any("samples" in r and r["transcript"] is None and "reject" not in r for r in results)
            if needs_asr and config.asr_model is None:
                for r in results:
                    if "samples" in r and r["transcript"] is None and "reject" not in r:
                        r["reject"] = "no transcript in the metadata and no --asr-model to transcribe it"
            elif needs_asr:
                if transcriber is None:
                    from desta.asr import make_transcriber

                    transcriber = make_transcriber(config.asr_backend, config.asr_model,
                                                   batch_size=config.asr_batch_size)
                _transcribe_pending(results, transcriber)
            described, rejected = [], []
            for index, row, result in zip(indices, rows, results, strict=True):
                result.pop("samples", None)
                if "reject" in result:
                    rejected.append({"id": row["id"], "source": result["source"], "reason": result["reject"]})
                    continue
                audio_seconds += result["duration"]
                described.append({"_index": index, "id": row["id"], **finish_row(result, config.attributes)})
            job.write(chunk, described, rejected)
            done_rows += len(indices)
            elapsed = time.perf_counter() - started
            bar.update(len(indices))
            bar.set_postfix(clips_per_s=f"{done_rows / elapsed:.1f}", rtf=f"{audio_seconds / elapsed:.0f}x")
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    if config.num_shards == 1:
        return merge(out)
    return {"shard": config.shard_index, "chunks": len(job.mine()), "run_now": len(todo)}


def merge(out: str | os.PathLike) -> dict[str, Any]:
    """Join every shard's parts into OUT/dataset and OUT/rejects.jsonl; checks that no chunk is missing."""
    job = ChunkedJob.open(out)
    described, rejects = job.collect()
    rejects = read_jsonl(job.parts / "load-rejects.jsonl") + rejects
    dataset, _ = open_source(job.job["source"], load_mapping(job.job["mapping"]), job.job["split"])
    indices = [row.pop("_index") for row in described]
    selected = attach_columns(dataset, indices, described)
    save_dataset_atomic(selected, job.out / DATASET)
    write_atomic(job.out / REJECTS, to_jsonl(rejects))
    inputs = job.total + job.job["load_rejects"]
    summary = {"inputs": inputs, "described": len(described), "rejected": len(rejects),
               "hours": round(sum(selected["duration"]) / 3600, 4) if len(selected) else 0.0}
    assert summary["described"] + summary["rejected"] == inputs, summary  # no row lost or doubled
    write_atomic(job.out / SUMMARY, json.dumps({**summary, "config": job.job}, indent=2))
    return summary
