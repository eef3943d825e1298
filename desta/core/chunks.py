"""Resumable, shardable batch work in chunks, shared by the describe and targets stages.

A job's rows are cut into fixed chunks; chunk c belongs to shard c % num_shards. Each finished
chunk is written atomically as OUT/parts/part-<c>.jsonl (rows) after part-<c>.rejects.jsonl, so
a killed run loses at most the chunk in flight and a rerun does only what is missing. Merging
reads every chunk in order and refuses to run while any is missing.

OUT/parts/job.json records what the parts were made from: every setting that changes a row and a
fingerprint of the source's content (desta.core.digests.content_fingerprint), not only its path. A rerun whose
source or settings differ is refused (or, with `overwrite`, starts over), so finished parts are
never attached to rows they were not made from; merging matches rows by id (`positions_by_id`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.core.args import raise_problems
from desta.core.artifacts import DATASET, PARTS, REJECTS, SUMMARY
from desta.core.summary import Summary

if TYPE_CHECKING:
    from datasets import Dataset

JOB = "job.json"  # what a run was made from; a resume must match it


@dataclass
class ChunkingSection:
    """How a batch stage cuts its work (a config section: `chunking.num_shards=4`): resumable chunks, shards across
    machines, the merge. None of it changes a row of the output."""

    chunk_size: int = 128
    """rows per resumable unit of work"""
    num_shards: int = 1
    """split the work across this many machines"""
    shard_index: int = 0
    """this machine's shard, 0-based; merge when all are done"""
    merge: bool = False
    """only join the finished shards in `out`"""
    overwrite: bool = False
    """when OUT holds parts made from another source or other settings, delete them and start over"""

    def __post_init__(self) -> None:
        problems = []
        if self.chunk_size < 1 or self.num_shards < 1:
            problems.append(("chunk_size", f"chunk_size and num_shards must be at least 1, got {self.chunk_size} "
                                           f"and {self.num_shards}"))
        elif not 0 <= self.shard_index < self.num_shards:
            problems.append(("shard_index", f"must be in [0, {self.num_shards - 1}], got {self.shard_index}"))
        raise_problems(problems)

    def job(self, out: str | os.PathLike, job: dict[str, Any], total: int,
            not_compared: tuple[str, ...] = ()) -> ChunkedJob:
        """This shard's chunks of the run `job` describes (see ChunkedJob)."""
        return ChunkedJob(out, job, total=total, chunk_size=self.chunk_size, num_shards=self.num_shards,
                          shard_index=self.shard_index, overwrite=self.overwrite, not_compared=not_compared)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_jsonl(rows: list[dict]) -> str:
    """Rows as JSON Lines text: one object per line, non-ASCII kept as is.

    >>> to_jsonl([{"a": 1}, {"b": "é"}])
    '{"a": 1}\\n{"b": "é"}\\n'
    """
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON Lines file, blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def positions_by_id(ids: list[str], where: str) -> dict[str, int]:
    """id -> row position; refuses duplicate ids, which would make matching rows by id ambiguous.

    >>> positions_by_id(["a", "b"], "x")
    {'a': 0, 'b': 1}
    """
    positions: dict[str, int] = {}
    doubled = []
    for position, row_id in enumerate(ids):
        if row_id in positions:
            doubled.append(row_id)
        positions[row_id] = position
    if doubled:
        raise ValueError(f"{where}: {len(doubled)} duplicate ids (e.g. {doubled[0]!r}); every row needs its own id "
                         "(desta describe rejects duplicates)")
    return positions


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two job descriptions, as "key: old -> new" (long values cut).

    >>> differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4})
    ['b: 2 -> 3', 'c: null -> 4']
    """
    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{key}: {short(old.get(key))} -> {short(new.get(key))}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def stale_error(out: Path, changed: list[str]) -> ValueError:
    """The error for an OUT made from another source or other settings, naming what changed and the fix."""
    return ValueError(f"{out} was made from a different source/settings ({'; '.join(changed)}); use a new --out "
                      "or --chunking.overwrite")


def check_accounted(out: Path, expected: Iterable[Any], found: Iterable[Any]) -> None:
    """Every expected key (a source row's id, or (id, prompt)) exactly once among the keys the parts hold,
    rows and rejects together; anything else means the parts were made from another source."""
    from collections import Counter

    expected, found = Counter(expected), Counter(found)
    missing, extra = expected - found, found - expected
    if missing or extra:
        raise stale_error(out, [f"{sum(missing.values())} source rows have no result (e.g. "
                                f"{next(iter(missing), None)!r})", f"{sum(extra.values())} results match no source "
                                f"row once (e.g. {next(iter(extra), None)!r})"])


# Every batch stage's settings that no row depends on: where it writes, whether it shows a bar.
RUN_ONLY = ("out", "progress")


def job_settings(config: Any, run_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a batch run's rows depend on, flat by setting name (as job.json files have always held them): every
    setting but RUN_ONLY, `run_only` and the chunking section; a section with an `identity()` (the generation
    backend) gives only that, any other section all its settings."""
    settings: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in RUN_ONLY + run_only or isinstance(value, ChunkingSection):
            continue
        if hasattr(value, "identity"):
            settings.update(value.identity())
        elif is_dataclass(value):
            settings.update(asdict(value))
        else:
            settings[f.name] = json.loads(json.dumps(value))
    return settings


class ChunkedJob:
    """The chunks of one run in OUT/parts; `job` describes the run (settings and the source's content
    fingerprint) and must match on resume, but for the keys in `not_compared` (e.g. the source's path:
    the same content under another path is the same source). With `overwrite`, parts of a different
    run are deleted and the run starts over; without it, they are an error that names what changed."""

    def __init__(self, out: str | os.PathLike, job: dict[str, Any], total: int, chunk_size: int,
                 num_shards: int = 1, shard_index: int = 0, overwrite: bool = False,
                 not_compared: tuple[str, ...] = ()):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} must be in [0, {num_shards - 1}]")
        self.out = Path(out)
        self.parts = self.out / PARTS
        self.total, self.chunk_size = total, chunk_size
        self.num_shards, self.shard_index = num_shards, shard_index
        job = json.loads(json.dumps({**job, "total": total, "chunk_size": chunk_size}))
        job_file = self.parts / JOB
        if job_file.exists():
            try:
                previous = json.loads(job_file.read_text())
            except json.JSONDecodeError:
                previous = {"job.json": "unreadable"}
            changed = differences({k: v for k, v in previous.items() if k not in not_compared},
                                  {k: v for k, v in job.items() if k not in not_compared})
            if changed and not overwrite:
                raise stale_error(self.out, changed)
            if changed:  # overwrite: what the other run wrote goes, so nothing of it can be mixed in
                shutil.rmtree(self.parts)
                shutil.rmtree(self.out / DATASET, ignore_errors=True)
                for name in (REJECTS, SUMMARY):
                    (self.out / name).unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        write_atomic(job_file, json.dumps(job, indent=2))
        self.job = job

    @classmethod
    def open(cls, out: str | os.PathLike) -> ChunkedJob:
        """An existing run, for merging."""
        job_file = Path(out) / PARTS / JOB
        if not job_file.is_file():
            raise FileNotFoundError(f"{job_file} not found; run the stage into {out} first")
        job = json.loads(job_file.read_text())
        return cls(out, {k: v for k, v in job.items() if k not in ("total", "chunk_size")}, job["total"],
                   job["chunk_size"])

    @property
    def num_chunks(self) -> int:
        """How many chunks the run's rows make (the last one may be short)."""
        return math.ceil(self.total / self.chunk_size)

    def rows_of(self, chunk: int) -> range:
        """The row indices that belong to `chunk`."""
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.total))

    def _part(self, chunk: int, kind: str = "") -> Path:
        return self.parts / f"part-{chunk:06d}{kind}.jsonl"

    def mine(self) -> list[int]:
        """The chunks of this shard (chunk c belongs to shard c % num_shards), done or not."""
        return [c for c in range(self.num_chunks) if c % self.num_shards == self.shard_index]

    def todo(self) -> list[int]:
        """This shard's chunks that are not finished yet."""
        return [c for c in self.mine() if not self._part(c).exists()]

    def write(self, chunk: int, rows: list[dict], rejects: list[dict]) -> None:
        """Store a finished chunk: its rejects first, then its rows, whose file marks the chunk done."""
        write_atomic(self._part(chunk, ".rejects"), to_jsonl(rejects))
        write_atomic(self._part(chunk), to_jsonl(rows))  # its presence marks the chunk done

    def collect(self) -> tuple[list[dict], list[dict]]:
        """Every chunk's rows and rejects, in order; raises while any chunk is missing."""
        missing = [c for c in range(self.num_chunks) if not self._part(c).exists()]
        if missing:
            raise ValueError(f"{len(missing)} of {self.num_chunks} chunks are not done yet (e.g. chunk {missing[0]}, "
                             f"shard {missing[0] % max(1, self.num_shards)} of a {self.num_shards}-way split); "
                             "run the remaining shards, then merge again")
        rows, rejects = [], []
        for chunk in range(self.num_chunks):
            rows += read_jsonl(self._part(chunk))
            rejects += read_jsonl(self._part(chunk, ".rejects"))
        return rows, rejects

    def shard_summary(self, stage: str, run_now: int) -> Summary:
        """What a shard's run reports (the merge comes once every shard is done): its chunks and the merge command."""
        figures = {"shard": self.shard_index, "chunks": len(self.mine()), "run_now": run_now}
        return Summary(figures, f"shard {self.shard_index}: {figures['chunks']} chunks done ({run_now} in this run); "
                                f"merge with: desta {stage} --merge --out {self.out}")

    def save_merged(self, dataset: Dataset, rows: list[dict], rejects: list[dict]) -> Dataset:
        """The merge's outputs: `rows` (each naming its source row by `id`, which is popped) joined to `dataset`'s
        rows into OUT/dataset, `rejects` into OUT/rejects.jsonl. Returns the saved selection."""
        positions = positions_by_id(dataset["id"], str(self.job["source"]))
        selected = attach_columns(dataset, [positions[row.pop("id")] for row in rows], rows)
        save_dataset_atomic(selected, self.out / DATASET)
        write_atomic(self.out / REJECTS, to_jsonl(rejects))
        return selected

    def write_summary(self, summary: dict[str, Any], counts: str) -> Summary:
        """OUT/summary.json: the merge's figures and the settings the parts were made with; returns the figures with
        the line the command prints (`counts`, then where the outputs are)."""
        write_atomic(self.out / SUMMARY, json.dumps({**summary, "config": self.job}, indent=2))
        return Summary(summary, f"{counts} -> {self.out / DATASET}, {self.out / REJECTS}")


def saved_empty(folder: str | os.PathLike) -> bool:
    """Whether a `save_to_disk` folder holds an empty selection: `datasets` writes no data file for one and
    cannot load it back (an IndexError deep inside), so callers say "no rows" first."""
    state = Path(folder) / "state.json"
    try:
        return state.is_file() and json.loads(state.read_text()).get("_data_files") == []
    except json.JSONDecodeError:
        return False


def save_dataset_atomic(dataset: Dataset, folder: Path) -> None:
    """`save_to_disk` into a temporary folder, then swap it in place."""
    import shutil

    from datasets import Dataset

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if len(dataset) == 0:  # datasets cannot load back an empty selection; an empty table with the schema it can
        dataset = Dataset.from_dict({name: [] for name in dataset.column_names}, features=dataset.features)
    dataset.save_to_disk(str(tmp), num_shards=1 if len(dataset) == 0 else None)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def attach_columns(dataset: Dataset, indices: list[int], rows: list[dict]) -> Dataset:
    """The source rows at `indices` with the new columns from `rows` (same order) added or replaced."""
    selected = dataset.select(indices)
    if not rows:
        return selected
    for name in rows[0]:
        if name in selected.column_names:
            selected = selected.remove_columns(name)
        selected = selected.add_column(name, [row[name] for row in rows])
    return selected
