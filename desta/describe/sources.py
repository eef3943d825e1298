"""Stage 1's inputs: where a corpus's rows come from, and which of its columns hold what.

A corpus mapping (a YAML file: desta/describe/mappings/<name>.yaml, or your own) names the columns that
hold id, audio, transcript and each label, and how labels are spelt. A source is a manifest (JSONL/CSV with
a path column, paths relative to it and kept inside its folder), a `datasets` folder, a Hub dataset id,
a lhotse corpus (a CutSet manifest or a `lhotse prepare` folder), or a corpus its mapping's `reader` reads
(the Asterisk prompts: desta.audio.asterisk). Each comes back as a `datasets` table with
undecoded audio and the rows it could not use, each with its reason.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from desta.core.extras import require_extra

if TYPE_CHECKING:
    from datasets import Dataset
    from lhotse import CutSet
    from lhotse.cut import Cut

LABEL_ATTRIBUTES = ("gender", "emotion", "accent", "age")
MAPPINGS_DIR = Path(__file__).resolve().parent / "mappings"  # package data: in the wheel too
# Corpora read by their own code (a mapping's `reader:`), named here so a YAML file can never name code to run.
READERS = {"asterisk": "desta.audio.asterisk:asterisk_source"}


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
    allowed = {"id", "audio", "transcript", "speaker", "labels", "reader", *LABEL_ATTRIBUTES}
    if set(mapping) - allowed:
        raise ValueError(f"{path}: unknown keys {sorted(set(mapping) - allowed)}; allowed: {sorted(allowed)}")
    if mapping.get("reader") is not None and mapping["reader"] not in READERS:
        raise ValueError(f"{path}: unknown reader {mapping['reader']!r}; choose one of {sorted(READERS)}")
    return mapping


# ----- sources -----

def _manifest_lines(path: Path) -> list[tuple[int, str | None, str | None]]:
    """(line number, text, problem) of every non-blank line; a line that is not UTF-8 has text None."""
    lines = []
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.removeprefix(b"\xef\xbb\xbf") if line_no == 1 else raw  # a byte-order mark
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            lines.append((line_no, None, f"not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                         "save the manifest as UTF-8"))
            continue
        if text.strip():
            lines.append((line_no, text, None))
    return lines


def _manifest_records(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, record, problem) per line of a JSONL or CSV manifest, one record per line."""
    lines = _manifest_lines(path)
    if path.suffix != ".csv":
        records: list[tuple[int, dict | None, str | None]] = []
        for line_no, text, problem in lines:
            record = None
            if problem is None:
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    problem = f"malformed JSON: {err.msg} (column {err.colno})"
                if problem is None and not isinstance(record, dict):
                    problem, record = f"not a JSON object but a {type(record).__name__}; give one object per line", None
            records.append((line_no, record, problem))
        return records
    if not lines or lines[0][1] is None:
        where = f"{path}:{lines[0][0]}" if lines else str(path)
        raise ValueError(f"{where}: no readable CSV header; the first line must name the columns (path, ...)")
    try:
        header = next(csv.reader([lines[0][1]], strict=True))
    except csv.Error as err:
        raise ValueError(f"{path}:{lines[0][0]}: malformed CSV header ({err})") from None
    records = []
    for line_no, text, problem in lines[1:]:
        record = None
        if problem is None:
            try:  # line by line: an unterminated quote spoils its own line, not the lines after it
                fields = next(csv.reader([text], strict=True))
            except csv.Error as err:
                fields, problem = [], f"malformed CSV ({err}; a quoted value must close on its own line)"
            if problem is None and len(fields) != len(header):
                problem = f"{len(fields)} fields where the header has {len(header)}"
            if problem is None:
                record = dict(zip(header, fields, strict=True))
        records.append((line_no, record, problem))
    return records


def _unwritable(record: dict) -> str | None:
    """The first column whose name or text cannot be stored as UTF-8 (a lone surrogate from a JSON escape)."""
    for key, value in record.items():
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return f"column {key.encode('utf-8', 'replace').decode()!r} holds text that is not valid UTF-8"
    return None


def _read_manifest(path: Path, id_column: str = "id",
                   allow_absolute_paths: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows of a JSONL or CSV manifest, with paths made absolute; a line that cannot be used (malformed,
    not UTF-8, no path, a path outside the manifest's folder, a duplicate id) comes back as a reject
    naming the line. A row's id is its `id_column` value, or its file name without the extension when
    that is missing, empty or null; the first row with an id keeps it, later ones are rejected."""
    rows, rejects = [], []
    folder = os.path.abspath(path.parent)
    first_line: dict[str, int] = {}
    for line_no, record, problem in _manifest_records(path):
        where = f"{path.name}:{line_no}"
        problem = problem or _unwritable(record)
        raw_path = None if problem else (record.get("path") or record.get("audio"))
        if problem is None and not raw_path:
            problem = "no 'path' column value"
        full = os.path.normpath(os.path.join(folder, str(raw_path))) if raw_path else ""
        if problem is None and not allow_absolute_paths and os.path.commonpath([folder, full]) != folder:
            problem = (f"path {str(raw_path)!r} leads outside the manifest's folder {folder}; move the audio under "
                       "it or pass --allow-absolute-paths")
        if problem:
            given = record.get(id_column) if isinstance(record, dict) else None
            rejects.append({"id": str(given) if given not in (None, "") else where, "source": where,
                            "reason": f"line {line_no}: {problem}"})
            continue
        row = {k: (None if v is None else str(v)) for k, v in record.items() if k not in ("path", "audio")}
        row["audio"] = {"path": full, "bytes": None}
        row_id = row.get(id_column) or Path(str(raw_path)).stem
        if row_id in first_line:
            rejects.append({"id": row_id, "source": where, "reason": f"line {line_no}: duplicate id {row_id!r} "
                                                                     f"(first used on line {first_line[row_id]}); "
                                                                     "ids must be unique"})
            continue
        first_line[row_id] = line_no
        row["id"] = row_id
        rows.append(row)
    return rows, rejects


def _unique_ids(dataset: Dataset, id_column: str, source: str) -> tuple[Dataset, list[dict]]:
    """The dataset with a text `id` column (from `id_column`; a missing or null id becomes "row-<position>")
    and only the first row of each id; the later ones come back as rejects."""
    if id_column in dataset.column_names:
        ids = [f"row-{i:08d}" if v in (None, "") else str(v) for i, v in enumerate(dataset[id_column])]
        dataset = dataset.remove_columns("id") if "id" in dataset.column_names else dataset
    else:
        ids = [f"row-{i:08d}" for i in range(len(dataset))]
    dataset = dataset.add_column("id", ids)
    first: dict[str, int] = {}
    rejects = []
    for position, row_id in enumerate(ids):
        if row_id in first:
            rejects.append({"id": row_id, "source": f"{source} row {position}", "reason": (
                f"duplicate id {row_id!r} (first used by row {first[row_id]}); ids must be unique")})
        else:
            first[row_id] = position
    if rejects:
        dataset = dataset.select(sorted(first.values()))
    return dataset, rejects


def open_source(source: str, mapping: dict[str, Any], split: str = "train",
                allow_absolute_paths: bool = False) -> tuple[Dataset, list[dict]]:
    """The source as a `datasets.Dataset` with an undecoded `audio` column and an `id` column of unique
    ids, plus rejects (malformed manifest lines, duplicate ids: all but the first row with an id)."""
    from datasets import Audio, Dataset, load_dataset, load_from_disk

    from desta.core.args import looks_local

    path = Path(source)
    rejects: list[dict] = []
    if mapping.get("reader"):  # a corpus with its own layout and codec (e.g. the Asterisk prompts)
        import importlib

        module, name = READERS[mapping["reader"]].split(":")
        dataset, rejects = getattr(importlib.import_module(module), name)(path)
    elif is_lhotse_manifest(path):
        dataset, rejects = lhotse_source(path, split)
    elif path.is_file() and path.suffix in (".jsonl", ".json", ".csv"):
        rows, rejects = _read_manifest(path, mapping.get("id", "id"), allow_absolute_paths)
        if not rows and not rejects:
            raise ValueError(f"{path} holds no rows; a manifest needs one row per clip with a 'path' column")
        columns = list(dict.fromkeys(key for row in rows for key in row))  # from_list keeps the first row's only
        dataset = Dataset.from_list([{key: row.get(key) for key in columns} for row in rows]) if rows \
            else Dataset.from_dict({"id": [], "audio": []})
    elif path.is_dir():
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict
            if split not in dataset:
                raise ValueError(f"{path} has splits {sorted(dataset)}, not {split!r}; pass --split")
            dataset = dataset[split]
    elif path.exists():
        raise ValueError(f"{path}: unsupported source; give a .jsonl/.csv manifest or a save_to_disk folder")
    elif looks_local(source):  # not a Hub dataset id: say so, rather than the Hub's "couldn't reach"
        raise FileNotFoundError(f"source {source} not found; give a .jsonl/.csv manifest, a save_to_disk folder or a "
                                "Hub dataset id")
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
    if not path.is_file():  # a manifest's ids are set and unique already
        dataset, doubled = _unique_ids(dataset, mapping.get("id", "id"), source)
        rejects += doubled
    return dataset, rejects


def is_lhotse_manifest(path: Path) -> bool:
    """Whether `path` is a lhotse CutSet manifest (cuts.jsonl[.gz]) or a `lhotse prepare` output folder
    (*_recordings_*.jsonl.gz beside *_supervisions_*.jsonl.gz)."""
    if path.is_dir():
        return any(path.glob("*recordings*.jsonl*")) and any(path.glob("*supervisions*.jsonl*"))
    if not (path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz"))):
        return False
    import gzip

    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as handle:  # bytes: a bad byte on a
        first = next((line for line in handle if line.strip()), b"")         # later line is the manifest reader's
    try:
        record = json.loads(first.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "recording" in record and "supervisions" in record


def _lhotse_cuts(path: Path, split: str) -> CutSet:
    """The CutSet of a cuts manifest, or of a `lhotse prepare` folder's recordings and supervisions for one
    part (`split`, e.g. dev-clean; the only part when there is one)."""
    require_extra("lhotse", f"reading the lhotse corpus {path}")
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


