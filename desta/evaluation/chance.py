"""What an eval set's closed items give away: the score of guessing, computed exactly from the items.

Two answerers that never hear the clip, scored item by item as a system would be:
- "chance": a uniformly random answer of the right form: one of the item's labels (1 / labels), yes or no (0.5),
  a duration drawn from the category's gold durations (the mean score of every other gold as the answer);
- "constant": the best constant answer per category and item form (the commonest gold label, the commoner of
  yes and no, the one duration that is right most often), scored on each item.
Transcription, instruction following and open questions have neither (None). A speech system hears a field only
where its score is above the stronger of the two, by a paired interval that excludes 0 (`margin_series`).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from desta.evaluation.items import parsed
from desta.evaluation.scoring import score_number

CHANCE, CONSTANT = "chance", "constant"


def _form(item: dict) -> str | None:
    style = (parsed(item, "check") or {}).get("style")
    if style == "yesno":
        return "yesno"
    if style == "number" or item["category"] == "duration":
        return "number"
    if parsed(item, "choices") and style in (None, "label"):
        return "label"
    return None


def baselines(items: list[dict]) -> dict[str, list[float | None]]:
    """{"chance": per item, the expected score of a uniformly random answer of its form; "constant": per item,
    the score of its category's best constant answer of that form} (None where the item has no closed answer).

    >>> items = [{"category": "gender", "choices": ["Female", "Male"], "check": {"style": "label"}, "answer": a}
    ...          for a in ("Male", "Male", "Female")]
    >>> baselines(items)
    {'chance': [0.5, 0.5, 0.5], 'constant': [1.0, 1.0, 0.0]}
    """
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    chance: list[float | None] = [None] * len(items)
    constant: list[float | None] = [None] * len(items)
    for k, item in enumerate(items):
        form = _form(item)
        if form is not None:
            groups[(item["category"], form)].append(k)
    for (_, form), members in groups.items():
        golds = [items[k]["answer"] for k in members]
        if form == "label":
            best = Counter(golds).most_common(1)[0][0]
            for k in members:
                chance[k] = 1 / len(parsed(items[k], "choices"))
                constant[k] = float(items[k]["answer"] == best)
        elif form == "yesno":
            best = Counter(golds).most_common(1)[0][0]
            for k in members:
                chance[k], constant[k] = 0.5, float(items[k]["answer"] == best)
        else:
            values = np.array([float(g) for g in golds])
            right = np.array([[score_number(f"{guess:g}", gold).value for guess in values] for gold in values])
            candidates = sorted({round(v * 2) / 2 for v in values} | {float(round(v)) for v in values})
            per_guess = {c: [score_number(f"{c:g}", gold).value for gold in values] for c in candidates}
            best = max(candidates, key=lambda c: (np.mean(per_guess[c]), -c))
            others = len(values) - 1
            for row, k in enumerate(members):
                chance[k] = float((right[row].sum() - right[row, row]) / others) if others else None
                constant[k] = per_guess[best][row]
    return {CHANCE: chance, CONSTANT: constant}


def stronger_baseline(items: list[dict], base: dict[str, list[float | None]]) -> list[float | None]:
    """Per item, the baseline (chance or constant) whose mean is the higher in the item's category."""
    means: dict[str, dict[str, float]] = defaultdict(dict)
    for name, values in base.items():
        by_category: dict[str, list[float]] = defaultdict(list)
        for item, value in zip(items, values, strict=True):
            if value is not None:
                by_category[item["category"]].append(value)
        for category, scored in by_category.items():
            means[category][name] = float(np.mean(scored))
    out: list[float | None] = []
    for k, item in enumerate(items):
        category_means = means.get(item["category"])
        if not category_means:
            out.append(None)
            continue
        out.append(base[max(category_means, key=category_means.get)][k])
    return out


def margin_series(scores: list[float | None], baseline: list[float | None]) -> list[float | None]:
    """A system's score minus the baseline, item by item (None where either is None): its interval is paired."""
    return [None if s is None or b is None else s - b for s, b in zip(scores, baseline, strict=True)]
