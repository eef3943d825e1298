"""Stage 4's items: unseen speech instructions built from a described dataset, saved and loaded.

`build_eval_set` turns a described dataset (gold attributes) into items: questions per attribute (one of
at least six phrasings drawn per item: one word, a choice from a list, yes/no, free form, a sentence),
duration, transcription, instruction following (a question plus one IFEval format instruction) and open
questions; no instruction is ever in a training pool (desta.prompts). `desta eval-set` writes them as a
`datasets` folder; `load_eval_set` reads it back, or any dataset with audio / instruction / answer columns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from desta.core.args import raise_problems
from desta.core.instructions import INSTRUCTION_KINDS, draw_instruction, instruction_text
from desta.core.summary import Summary
from desta.prompts import EVAL_INSTRUCTIONS

if TYPE_CHECKING:
    from datasets import Dataset

CLOSED = ("gender", "accent", "emotion", "speaking_speed", "pitch", "volume")
ITEM_COLUMNS = ["item_id", "id", "category", "instruction", "answer", "choices", "check", "description", "transcript",
                "voice"]  # voice: the clip's voice id where its corpus records one (seen vs unseen voices)
# Column maps of public benchmarks saved as `datasets` folders (`desta eval --columns ...`); benchmarks read
# in their authors' own layout are desta.evaluation.benchmarks.
COLUMN_MAPS = {
    "dynamic-superb": {"audio": "audio", "instruction": "instruction", "answer": "label"},
    "mmau": {"audio": "audio", "instruction": "question", "answer": "answer", "choices": "choices"},
    "air-bench": {"audio": "audio", "instruction": "question", "answer": "answer_gt", "choices": "choices"},
}


def parsed(item: dict, key: str) -> Any:
    """An item's field, JSON text decoded (saved sets store choices and checks as JSON text)."""
    value = item.get(key)
    return json.loads(value) if isinstance(value, str) else value


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
                            description=row["description"], transcript=row.get("transcript"), audio=row["audio"],
                            voice=row.get("voice"))
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
    """use at most this many clips (the first by id, after unseen_voices_of)"""
    unseen_voices_of: str | None = None
    """keep only clips whose voice no row of this dataset folder uses (a training corpus's described or
    targets dataset): an eval set of voices the model never heard"""
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


def write_eval_set(config: EvalSetConfig) -> Summary:
    """Build and save the eval set; returns the item count per category."""
    from datasets import load_from_disk

    if not Path(config.source).is_dir():
        raise FileNotFoundError(f"{config.source} not found; give the dataset folder written by desta describe")
    described = load_from_disk(config.source)
    items = build_eval_set(described, seed=config.seed, categories=config.categories,
                           if_items_per_clip=config.if_items_per_clip)  # label sets from every clip
    clips = sorted(set(described["id"]))
    if config.unseen_voices_of:
        clips = unseen_voice_clips(described, config.unseen_voices_of)
    keep = set(clips[: config.max_clips] if config.max_clips else clips)
    items = [i for i in items if i["id"] in keep]
    save_eval_set(items, config.out)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    return Summary(counts, f"wrote {sum(counts.values())} items to {config.out}: {counts}")


def unseen_voice_clips(described: Dataset, training: str) -> list[str]:
    """The ids (sorted) of the described clips whose voice no row of the `training` dataset folder uses."""
    from datasets import load_from_disk

    if not Path(training).is_dir():
        raise FileNotFoundError(f"unseen_voices_of: {training} not found; give the training clips' dataset folder "
                                "(OUT/dataset of desta describe or desta targets)")
    train = load_from_disk(training)
    for name, dataset in (("unseen_voices_of " + training, train), ("source", described)):
        if "voice" not in dataset.column_names:
            raise ValueError(f"{name} has no voice column, so unseen voices cannot be told apart; describe a corpus "
                             "whose manifest names each clip's voice (desta synth writes it)")
    heard = {str(v) for v in train["voice"] if v}
    clips = sorted({clip for clip, voice in zip(described["id"], described["voice"], strict=True)
                    if voice and str(voice) not in heard})
    if not clips:
        raise ValueError(f"every clip of the source speaks with a voice of {training}: no unseen voice to evaluate")
    return clips


def load_eval_set(path: str | os.PathLike, columns: dict[str, str] | None = None) -> Dataset:
    """An eval set written by `desta eval-set`, or any dataset with audio / instruction / answer columns
    (`columns` maps our names to its names, e.g. COLUMN_MAPS["mmau"])."""
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
