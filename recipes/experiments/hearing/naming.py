"""How often each target set states a clip's gold value: per field, the share of all answers naming exactly it (the
eval's label words, as `desta probe` counts them) and the share of the answers to questions about that field, with
95 % bootstrap intervals. A speech model cannot learn to hear a field its targets rarely state.

    python recipes/experiments/hearing/naming.py smol=runs/experiments/data/targets-voice-smol/dataset \
        qwen=runs/experiments/data/targets-voice-qwen/dataset --out recipes/experiments/hearing/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import load_from_disk

from desta.core.stats import mean_interval
from desta.evaluation.scoring import named_labels
from desta.prompts import prompt_category, training_pool

FIELDS = ("gender", "accent", "pitch", "volume", "speaking_speed")


def naming(rows: list[dict], field: str, labels: list[str], pool: dict) -> dict:
    """The share of answers naming exactly the gold value of `field`: of all answers, and of those asked about it."""
    result = {}
    for name, kept in (("all", rows), ("asked", [r for r in rows if prompt_category(pool, r["prompt"]) == field])):
        named = [float(named_labels(r["response"], labels, field) == {r[field]}) for r in kept if r.get(field)]
        value, low, high = mean_interval(named, seed=0)
        result[name] = {"value": round(value, 3), "ci": [round(low, 3), round(high, 3)], "answers": len(named)}
    return result


def main() -> None:
    """Count each target set given and write naming.json and naming.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", help="NAME=FOLDER: a targets dataset (OUT/dataset of desta targets)")
    parser.add_argument("--out", default="recipes/experiments/hearing/results")
    args = parser.parse_args()
    found = {}
    for entry in args.sets:
        name, folder = entry.split("=", 1)
        dataset = load_from_disk(folder)
        rows = dataset.remove_columns([c for c in ("audio",) if c in dataset.column_names]).to_list()
        pool = training_pool(rows[0]["prompt_pool"])
        labels = {f: sorted({r[f] for r in rows if r.get(f)}) for f in FIELDS}
        found[name] = {field: naming(rows, field, labels[field], pool) for field in FIELDS}
    lines = ["| field | " + " | ".join(f"{n}: all answers | {n}: answers asked about it" for n in found) + " |",
             "|---|" + "---|---|" * len(found)]
    for field in FIELDS:
        cells = [f"{c['value']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] ({c['answers']})"
                 for n in found for c in (found[n][field]["all"], found[n][field]["asked"])]
        lines.append(f"| {field} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "naming.json").write_text(json.dumps(found, indent=2) + "\n")
    (out / "naming.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
