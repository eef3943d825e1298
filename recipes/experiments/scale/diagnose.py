"""Why a speech model does or does not learn the voice attributes: what the frozen Whisper features carry
and what the training targets teach, per attribute.

- features: a linear probe (multinomial logistic regression on the clip's time-averaged features of each
  tapped encoder layer, k-fold cross-validated) against always answering the most common label. A probe
  far above that says the information reaches the connector's input.
- targets: how often a training answer names the clip's gold label (and how often any label of the set),
  by the eval's own label matcher (desta.evaluation.scoring.named_labels, synonyms and pronouns included, so an upper
  bound). A model is only taught what its targets say.

    python recipes/experiments/scale/diagnose.py [--data runs/experiments/data] [--out DIR]

Writes diagnose.md and diagnose.json under --out (default: recipes/experiments/scale/results). About
30 seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk

from desta.core.stats import mean_interval
from desta.describe.probe import out_of_fold
from desta.evaluation.scoring import named_labels
from desta.train.features import FeatureCache

ATTRIBUTES = ("gender", "accent", "speaking_speed", "pitch", "volume", "emotion")


def pooled_features(cache: FeatureCache, ids: list[str]) -> np.ndarray:
    """(clips, layers, d_model): each clip's features averaged over its windows and time steps."""
    rows = []
    for clip in ids:
        windows = cache[clip]  # each (layers, steps, d_model)
        rows.append(torch.cat(windows, dim=1).mean(dim=1).numpy())
    return np.stack(rows)


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int, seed: int, l2: float = 1e-3) -> np.ndarray:
    """Out-of-fold correctness (0/1 per clip) of a logistic regression on standardised features."""
    return out_of_fold(x, y, int(y.max()) + 1, folds, seed, l2)[0]


def _cell(values: np.ndarray | list[float], seed: int) -> dict:
    mean, low, high = mean_interval(list(values), seed=seed)
    return {"value": mean, "ci": [low, high]}


def diagnose(features: str, targets: str, folds: int = 5, seed: int = 0) -> dict:
    """Per attribute: labels, the majority rate, the probe's accuracy per tapped layer, and the share of
    target answers naming the gold label / any label; each with a 95 % bootstrap interval over clips."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # the probes' initial weights: the same table on every rerun
    data = load_from_disk(targets)
    rows = data.select_columns([c for c in ("id", "response", *ATTRIBUTES) if c in data.column_names]).to_list()
    cache = FeatureCache(features)
    clips: dict[str, dict] = {}
    for row in rows:  # read once, without the audio column
        clips.setdefault(row["id"], row)
    ids = [clip for clip in clips if clip in cache.meta["clips"]]
    x = pooled_features(cache, ids)
    out: dict = {"clips": len(ids), "target_rows": len(data), "layers": cache.meta["tapped_layers"],
                 "encoder": Path(cache.meta["encoder"]).name, "attributes": {}}
    for attribute in ATTRIBUTES:
        gold = [clips[c].get(attribute) for c in ids]
        labels = sorted({g for g in gold if g})
        if len(labels) < 2:
            continue
        keep = np.array([g is not None for g in gold])
        y = np.array([labels.index(g) for g in gold if g is not None])
        majority = np.bincount(y).max() / len(y)
        layers = {str(layer): _cell(probe_accuracy(x[keep, i], y, folds, seed), seed)
                  for i, layer in enumerate(cache.meta["tapped_layers"])}
        labelled = [row for row in rows if row.get(attribute)]
        named = [named_labels(row["response"], labels, attribute) for row in labelled]
        states_gold = [float(n == {row[attribute]}) for n, row in zip(named, labelled, strict=True)]
        names_any = [float(bool(n)) for n in named]
        out["attributes"][attribute] = {"labels": labels, "majority": majority, "probe": layers,
                                        "targets_name_gold": _cell(states_gold, seed),
                                        "targets_name_any": _cell(names_any, seed)}
    return out


def render(result: dict) -> str:
    """The markdown table of `diagnose`'s result."""
    layers = [str(layer) for layer in result["layers"]]

    def fmt(cell: dict) -> str:
        return f"{cell['value']:.2f} [{cell['ci'][0]:.2f}, {cell['ci'][1]:.2f}]"

    lines = [f"# What {result['encoder']}'s features carry and what the targets teach", "",
             f"{result['clips']} training clips, {result['target_rows']} target answers; probe accuracy out of "
             "fold (5-fold), 95 % bootstrap intervals over clips.", "",
             "| attribute | labels | always the commonest | " + " | ".join(f"probe, layer {layer}" for layer in layers)
             + " | targets naming the gold label | targets naming any label |",
             "|---|---|---|" + "---|" * len(layers) + "---|---|"]
    for name, row in result["attributes"].items():
        probes = " | ".join(fmt(row["probe"][layer]) for layer in layers)
        lines.append(f"| {name} | {len(row['labels'])} | {row['majority']:.2f} | {probes} | "
                     f"{fmt(row['targets_name_gold'])} | {fmt(row['targets_name_any'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command line: read the experiment's data folder, write diagnose.md and diagnose.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="runs/experiments/data", help="the folder data.sh wrote")
    parser.add_argument("--targets", default=None, help="targets dataset (default: DATA/targets-self/dataset)")
    parser.add_argument("--out", default="recipes/experiments/scale/results")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    data = Path(args.data)
    result = diagnose(str(data / "features"), args.targets or str(data / "targets-self" / "dataset"), args.folds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))
    (out / "diagnose.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
