"""What every public benchmark is to desta: one `Benchmark` record holding all it needs (loader, scoring rule,
official figures and their report section, text version, system prompt, judge), and the helpers loaders share.

An item: item_id, id (the clip; one Whisper transcript per clip), category (subset or task), instruction
(the text the speech model gets with the audio), text_input (the item as text, or None), system (the
system prompt the authors' runner used, or None), audio ({"bytes", "path"}), answer, choices, check (how
to score it: {"style": ..., ...}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desta.core.hub import is_hub_id
from desta.evaluation.systems import Judging

Items = tuple[list[dict], list[dict]]  # (items, rejects with their reasons)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as desta runs it: read from its published layout and scored by its authors' rules."""

    name: str
    published: str  # the layout the loader reads, for help and errors
    load: Callable[[str, list[str] | None], Items]  # (source folder or Hub id, subsets) -> items, rejects
    score: Callable[[dict, str, int], dict[str, Any]]  # (item, answer, seed) -> {"score": 0..1 or None, "reason"}
    official: Callable[[list[dict], list[dict]], dict[str, Any]]  # one system's figures as the authors report them
    render: Callable[[dict[str, dict], list[str]], list[str]]  # report.md lines: official by system, system labels
    text_reference: str | None = None  # what the text version of an item is; None: the benchmark has none
    system_prompt: str | None = None  # what the authors' runner sends to the model
    judging: Judging | None = None  # how the items no rule scores are judged


def resolve_source(source: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder (or file) as given, or a Hub dataset id downloaded with huggingface_hub (only the files
    `allow_patterns` names); a clear error when it is neither."""
    path = Path(source)
    if path.exists():
        return path
    if is_hub_id(source):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, repo_type="dataset", allow_patterns=allow_patterns))
    raise FileNotFoundError(f"benchmark source {source!r} is neither a local path nor a Hub dataset id (owner/name)")


def audio_file(path: Path) -> dict:
    """An audio column value for a file on disk."""
    return {"path": str(path), "bytes": None}


def chosen(subsets: list[str] | None, known: dict[str, Any] | list[str], benchmark: str) -> list[str]:
    """The subsets asked for (all when None), refused with the known ones named when unknown."""
    unknown = sorted(set(subsets or []) - set(known))
    if unknown:
        raise ValueError(f"unknown {benchmark} subsets {unknown}; choose from {sorted(known)}")
    return list(subsets or known)


def mean(values: list[float]) -> float | None:
    """The mean, or None for no values."""
    return sum(values) / len(values) if values else None


def pct(value: float | None, digits: int = 2) -> str:
    """A percentage figure for a report cell ("n/a" for None)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def by_category(items: list[dict], results: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """(item, result) pairs grouped by the item's category, in order."""
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for item, result in zip(items, results, strict=True):
        groups.setdefault(item["category"], []).append((item, result))
    return groups
