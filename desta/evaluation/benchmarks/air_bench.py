"""AIR-Bench Foundation (qyang1021/AIR-Bench-Dataset): single-choice questions about speech, sound and music,
as its authors score them: the option letter an answer starts (or ends) with; an answer with none leaves the
denominator. No text version of its items.
"""

from __future__ import annotations

import json
from typing import Any

from desta.evaluation.benchmarks.base import Benchmark, audio_file, by_category, mean, pct, resolve_source

AIR_PROMPT = ("Choose the most suitable answer from options A, B, C, and D to respond the question in next line, "
              "you may only choose A or B or C or D.")  # the authors' inference prompt


def load_air_bench(source: str, subsets: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Foundation/Foundation_meta.json (a list of records) with audio at Foundation/<task>_<dataset>/<path>
    (Audio_Grounding's files are .flac where the meta says .wav). `subsets`: task names or task_dataset ids."""
    root = resolve_source(source, ["Foundation/*"])
    folder = root / "Foundation" if (root / "Foundation").is_dir() else root
    meta = folder / "Foundation_meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{root}: no Foundation/Foundation_meta.json; give the AIR-Bench-Dataset folder")
    items, rejects = [], []
    for record in json.loads(meta.read_text()):
        task = f"{record['task_name']}_{record['dataset_name']}"
        if subsets and record["task_name"] not in subsets and task not in subsets:
            continue
        item_id = f"{task}:{record['uniq_id']}"
        name = record["path"][:-3] + "flac" if record["task_name"] == "Audio_Grounding" else record["path"]
        audio = folder / task / name
        choices = [record.get(f"choice_{k}") for k in "abcd"]
        present = [c for c in choices if c is not None]
        gold = next((letter for letter, c in zip("ABCD", choices, strict=True) if c == record["answer_gt"]), None)
        if not audio.is_file():
            rejects.append({"id": item_id, "source": str(audio), "reason": "audio file not found"})
            continue
        if gold is None:
            rejects.append({"id": item_id, "source": str(meta), "reason": f"answer_gt {record['answer_gt']!r} is "
                                                                          "none of the choices"})
            continue
        # as the authors print them: missing choices C and D read "None"
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", choices, strict=True))
        items.append({"item_id": item_id, "id": item_id, "category": task, "system": None, "text_input": None,
                      "instruction": f"{AIR_PROMPT}\n{record['question']}\n{options}", "audio": audio_file(audio),
                      "answer": gold, "choices": present, "check": {"style": "air_letter"}})
    return items, rejects


def air_letter(answer: str) -> str | None:
    """AIR-Bench's reading of an answer: its first character if a letter A-D, else its second-to-last
    (for "The answer is B."); None when neither (the item then leaves the denominator).

    >>> air_letter("B"), air_letter("The answer is C."), air_letter("I think it is a dog"), air_letter("")
    ('B', 'C', None, None)
    """
    text = answer.strip().replace("\n", "")
    if not text or text == "None":
        return None
    if text[0] in "ABCD":
        return text[0]
    if len(text) > 1 and text[-2] in "ABCD":
        return text[-2]
    return None


def score(item: dict, answer: str, seed: int = 0) -> dict[str, Any]:
    """Right when the answer's option letter is the gold one; no letter: left out ("failed")."""
    letter = air_letter(answer)
    if letter is None:
        return {"score": None, "reason": "no option letter: left out, as the authors do", "failed": True}
    return {"score": float(letter == item["answer"]), "reason": f"answered {letter}", "failed": False}


def official(items: list[dict], results: list[dict]) -> dict[str, Any]:
    """Accuracy per task over the answers with a letter, their macro and micro means, the failed counts."""
    by = by_category(items, results)
    tasks = {}
    for task, pairs in by.items():
        kept = [r for _, r in pairs if not r.get("failed")]
        correct = sum(r["score"] for r in kept)
        tasks[task] = {"n": len(pairs), "failed": len(pairs) - len(kept),
                       "accuracy": 100 * correct / len(kept) if kept else None,
                       "accuracy_failed_as_wrong": 100 * correct / len(pairs)}
    kept = [r for r in results if not r.get("failed")]
    return {"tasks": tasks, "macro": mean([t["accuracy"] for t in tasks.values() if t["accuracy"] is not None]),
            "micro": 100 * sum(r["score"] for r in kept) / len(kept) if kept else None,
            "failed": len(results) - len(kept)}


def render(official: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """A row per task (accuracy and failed answers), then macro / micro."""
    systems = list(official)
    lines = ["| task | n | " + " | ".join(f"{labels[s]} acc. (failed)" for s in systems) + " |",
              "|" + "---|" * (len(systems) + 2)]
    for task, row in official[systems[0]]["tasks"].items():
        lines.append(f"| {task} | {row['n']} | " + " | ".join(
            f"{pct(official[s]['tasks'][task]['accuracy'])} ({official[s]['tasks'][task]['failed']})"
            for s in systems) + " |")
    lines.append("| **macro / micro** | | " + " | ".join(
        f"{pct(official[s]['macro'])} / {pct(official[s]['micro'])}" for s in systems) + " |")
    lines.append("\nAccuracy (%) over the answers that start with (or end in) an option letter; the others "
                 "(failed) leave the denominator, as AIR-Bench's scorer does.")
    return lines


AIR_BENCH = Benchmark(name="air-bench", load=load_air_bench, score=score, official=official, render=render,
                      published="Hub dataset qyang1021/AIR-Bench-Dataset (Foundation/)")
