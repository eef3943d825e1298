"""MMAU test-mini (Sakshi113/MMAU): multiple-choice questions about sound, music and speech, as its authors
score them: an answer is right when it holds every word of the right choice and no word only a wrong choice
has. No text version of its items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from desta.evaluation.benchmarks.base import Benchmark, audio_file, pct, resolve_source


def load_mmau(source: str, subsets: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """mmau-test-mini.json (a list of records: id, audio_id "./test-mini-audios/<id>.wav", question, choices,
    answer, task, category, sub-category, difficulty, ...) in the folder holding test-mini-audios/, or the JSON
    file itself. `subsets`: tasks (sound, music, speech)."""
    root = resolve_source(source)
    meta = root if root.is_file() else root / "mmau-test-mini.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{root}: no mmau-test-mini.json; give the folder holding it and test-mini-audios/")
    items, rejects = [], []
    for record in json.loads(meta.read_text()):
        if subsets and record["task"] not in subsets:
            continue
        audio = meta.parent / record["audio_id"].removeprefix("./")
        if not audio.is_file():
            rejects.append({"id": record["id"], "source": str(audio), "reason": "audio file not found"})
            continue
        choices = [str(c) for c in record["choices"]]
        quoted = [f'"{c}"' for c in choices]
        options = ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        category = record.get("category")
        items.append({"item_id": record["id"], "id": record["id"], "category": record["task"], "system": None,
                      "text_input": None, "instruction": f"{record['question']} Choose from the following options: "
                                                         f"{options}", "audio": audio_file(audio),
                      "answer": str(record["answer"]), "choices": choices,
                      "check": {"style": "mmau_match", "difficulty": record.get("difficulty"),
                                "sub_category": record.get("sub-category"),
                                "category": category[0] if isinstance(category, list) else category}})
    return items, rejects


def _words(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def mmau_match(answer: str, gold: str, choices: list[str]) -> bool:
    """MMAU's string match: every word of the gold choice is in the answer, and no word that only a wrong choice
    has (a word of a wrong choice that the gold choice lacks).

    >>> mmau_match("A man is speaking", "Man", ["Man", "Woman"]), mmau_match("man or woman", "Man", ["Man", "Woman"])
    (True, False)
    """
    said, wanted = _words(answer), _words(gold)
    if not said:
        return False
    wrong = set().union(*[_words(c) - wanted for c in choices if _words(c) != wanted])
    return wanted <= said and not said & wrong


def score(item: dict, answer: str, seed: int = 0) -> dict[str, Any]:
    """MMAU's string match against the item's choices."""
    ok = mmau_match(answer, item["answer"], item["choices"])
    return {"score": float(ok), "reason": "matches the answer" if ok else "does not match the answer alone"}


def official(items: list[dict], results: list[dict]) -> dict[str, Any]:
    """Accuracy in % overall and by task, difficulty and sub-category."""
    def accuracy(key: Callable[[dict], str | None]) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for item, result in zip(items, results, strict=True):
            groups.setdefault(str(key(item)), []).append(result["score"])
        return {k: 100 * sum(v) / len(v) for k, v in sorted(groups.items())}

    return {"total": 100 * sum(r["score"] for r in results) / len(results),
            "task": accuracy(lambda i: i["category"]), "difficulty": accuracy(lambda i: i["check"]["difficulty"]),
            "sub_category": accuracy(lambda i: i["check"]["sub_category"])}


def render(official: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Accuracy by task and difficulty, then the total."""
    systems = list(official)
    lines = ["| | " + " | ".join(labels[s] for s in systems) + " |", "|" + "---|" * (len(systems) + 1)]
    for group in ("task", "difficulty"):
        for key in official[systems[0]][group]:
            lines.append(f"| {group} {key} | " + " | ".join(pct(official[s][group][key]) for s in systems)
                         + " |")
    lines.append("| **total** (%) | " + " | ".join(pct(official[s]["total"]) for s in systems) + " |")
    lines.append("\nMMAU's string match: the answer holds every word of the right choice and no word only a "
                 "wrong choice has.")
    return lines


MMAU = Benchmark(name="mmau", load=load_mmau, score=score, official=official, render=render,
                 published="GitHub Sakshi113/MMAU mmau-test-mini.json + test-mini-audios/")
