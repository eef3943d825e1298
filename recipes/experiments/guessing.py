"""What guessing scores on the experiments' eval set (240 items of 24 held-out clips), per category: chance and the
best constant answer (desta.evaluation.chance), under today's scoring and under the duration rule the earlier
reports used (right within 25 % or 1 s). Writes recipes/experiments/guessing.json, which tables.py reads.

    python recipes/experiments/guessing.py runs/experiments/data/evalset-24
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from desta.evaluation.chance import baselines
from desta.evaluation.items import load_eval_set

OUT = Path(__file__).resolve().parent / "guessing.json"


def guessing(eval_set: str) -> dict:
    """{category: {"n", "chance", "constant"}} under today's scoring, and the best constant duration under the
    earlier rule."""
    items = [dict(row) for row in load_eval_set(eval_set).remove_columns(["audio"])]
    base = baselines(items)
    found: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item, chance, constant in zip(items, base["chance"], base["constant"], strict=True):
        if chance is not None:
            found[item["category"]]["chance"].append(chance)
            found[item["category"]]["constant"].append(constant)
    table = {category: {"n": len(v["chance"]), "chance": float(np.mean(v["chance"])),
                        "constant": float(np.mean(v["constant"]))} for category, v in found.items()}
    golds = [float(i["answer"]) for i in items if i["category"] == "duration"]
    earlier = max(np.mean([abs(guess - g) <= max(1.0, 0.25 * g) for g in golds]) for guess in np.arange(1, 8, 0.5))
    table["duration"]["constant_earlier_rule"] = float(earlier)
    return {"eval_set": "240 items of the first 24 clips of `desta synth --num-clips 48 --seed 1` (as of c54c4fb)",
            "categories": table}


if __name__ == "__main__":
    OUT.write_text(json.dumps(guessing(sys.argv[1]), indent=1) + "\n")
    print(OUT.read_text())
