"""The knowledge split: how well the base model already masters each new-task item, from its own answers; the
knowledge_filter, knowledge_known and knowledge_unknown strategies (desta.posttrain.strategies) train on parts of it.

The categories of Gekhman et al. (EMNLP 2024, "Does fine-tuning LLMs on new knowledge encourage
hallucinations?"), with the task's verifier as the judge: HighlyKnown (the greedy answer is right),
MaybeKnown (wrong, but right greedily with solved examples before the question: few-shot),
WeaklyKnown (wrong both ways, but right in some of N sampled answers), Unknown (never right). Their
finding: Unknown items are learnt slowly and, once learnt, make the model forget and hallucinate;
MaybeKnown items help most. knowledge_known and knowledge_unknown test it directly: the same number
of items, all HighlyKnown/MaybeKnown or all Unknown (`knowledge_subset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from desta.core.args import raise_problems
from desta.core.generation import Backend, SamplingSettings
from desta.core.sequences import Conversation
from desta.posttrain.verifiers import Verifier

KNOWLEDGE = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
KNOWN = ("HighlyKnown", "MaybeKnown")  # what knowledge_known trains on; knowledge_unknown trains on Unknown


@dataclass
class KnowledgeSection:
    """The knowledge split of the training items (knowledge_filter, knowledge_known, knowledge_unknown)."""

    shots: int = 3
    """solved examples (other training items) before the question in the few-shot probe"""
    samples: int = 4
    """sampled answers per item tried before calling it Unknown"""
    temperature: float = 0.7
    """sampling temperature of those answers"""
    drop: list[str] = field(default_factory=lambda: ["Unknown"])
    """knowledge categories knowledge_filter leaves out of training (HighlyKnown, MaybeKnown, WeaklyKnown,
    Unknown); [] keeps every item and only reports the split"""
    match_size: bool = True
    """knowledge_known (HighlyKnown and MaybeKnown items) and knowledge_unknown (Unknown items) train on as many
    items each, the larger set drawn down to the smaller: only which items differs. false: all of each"""

    def __post_init__(self) -> None:
        problems = []
        if self.samples < 1 or self.shots < 0:
            problems.append(("samples", f"samples must be at least 1 and shots 0 or more, got {self.samples} and "
                                        f"{self.shots}"))
        if set(self.drop) - set(KNOWLEDGE):
            problems.append(("drop", f"unknown categories {sorted(set(self.drop) - set(KNOWLEDGE))}; choose from "
                                     f"{list(KNOWLEDGE)}"))
        raise_problems(problems)


def mastery(greedy_ok: bool, few_shot_ok: bool, sampled_ok: list[bool]) -> str:
    """An item's category from whether its greedy, few-shot and sampled answers verified.

    >>> mastery(False, True, []), mastery(False, False, [False, True]), mastery(False, False, [False, False])
    ('MaybeKnown', 'WeaklyKnown', 'Unknown')
    """
    if greedy_ok:
        return "HighlyKnown"
    if few_shot_ok:
        return "MaybeKnown"
    return "WeaklyKnown" if any(sampled_ok) else "Unknown"


def few_shot(rows: list[dict], index: int, shots: int) -> Conversation:
    """Row `index`'s question after `shots` solved examples: the rows after it (wrapping round), never itself.

    >>> rows = [{"instruction": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    >>> [m["content"] for m in few_shot(rows, 2, 2)]
    ['q0', 'a0', 'q1', 'a1', 'q2']
    """
    examples = [rows[(index + k) % len(rows)] for k in range(1, min(shots, len(rows) - 1) + 1)]
    turns = [m for r in examples for m in ({"role": "user", "content": r["instruction"]},
                                           {"role": "assistant", "content": r["answer"]})]
    return turns + [{"role": "user", "content": rows[index]["instruction"]}]


def knowledge_split(backend: Backend, rows: list[dict], verifier: Verifier, shots: int = 3, samples: int = 4,
                    temperature: float = 0.7, seed: int = 0, max_new_tokens: int = 160) -> list[str]:
    """Each row's category (`mastery`). Every stage asks only about the rows the earlier ones left undecided."""
    greedy = SamplingSettings(max_new_tokens=max_new_tokens)

    def right(conversations: list[Conversation], golds: list[Any], settings: SamplingSettings) -> list[bool]:
        answers = backend.generate(conversations, settings) if conversations else []
        return [verifier(a.text, g)[0] for a, g in zip(answers, golds, strict=True)]

    plain = right([[{"role": "user", "content": r["instruction"]}] for r in rows], [r["gold"] for r in rows], greedy)
    left = [i for i, ok in enumerate(plain) if not ok]
    shot_ok = dict.fromkeys(left, False)
    if shots and len(rows) > 1:
        shot_ok = dict(zip(left, right([few_shot(rows, i, shots) for i in left], [rows[i]["gold"] for i in left],
                                       greedy), strict=True))
    left = [i for i in left if not shot_ok[i]]
    flat = right([[{"role": "user", "content": rows[i]["instruction"]}] for i in left for _ in range(samples)],
                 [rows[i]["gold"] for i in left for _ in range(samples)],
                 SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    sampled = {i: flat[n * samples : (n + 1) * samples] for n, i in enumerate(left)}
    return [mastery(plain[i], shot_ok.get(i, False), sampled.get(i, [])) for i in range(len(rows))]


def split_counts(categories: list[str]) -> dict[str, int]:
    """How many items each category holds, in the order HighlyKnown, MaybeKnown, WeaklyKnown, Unknown.

    >>> split_counts(["Unknown", "HighlyKnown", "Unknown"])
    {'HighlyKnown': 1, 'MaybeKnown': 0, 'WeaklyKnown': 0, 'Unknown': 2}
    """
    return {name: categories.count(name) for name in KNOWLEDGE}


def knowledge_filter(backend: Backend, rows: list[dict], verifier: Verifier, drop: list[str], shots: int = 3,
                     samples: int = 4, temperature: float = 0.7, seed: int = 0,
                     max_new_tokens: int = 160) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The rows to train on (those whose category is not in `drop`), every row with its category, and notes:
    the split's counts and how many rows were dropped."""
    categories = knowledge_split(backend, rows, verifier, shots, samples, temperature, seed, max_new_tokens)
    labelled = [{**row, "knowledge": category} for row, category in zip(rows, categories, strict=True)]
    kept = [row for row, category in zip(rows, categories, strict=True) if category not in drop]
    if not kept:
        raise ValueError(f"knowledge_filter left no training item: all {len(rows)} are in {drop} "
                         f"({split_counts(categories)}); drop fewer categories (knowledge.drop)")
    return kept, labelled, {"split": split_counts(categories), "dropped": len(rows) - len(kept)}


def knowledge_subset(rows: list[dict], categories: list[str], keep: Literal["known", "unknown"], match_size: bool,
                     seed: int = 0) -> tuple[list[dict], dict[str, Any]]:
    """The rows knowledge_known (`keep` known: HighlyKnown and MaybeKnown) or knowledge_unknown (Unknown) trains on,
    drawn down (seeded, in their order) to the size of the other set when `match_size`; and notes.

    >>> rows = [{"gold": str(i)} for i in range(5)]
    >>> cats = ["Unknown", "HighlyKnown", "Unknown", "Unknown", "MaybeKnown"]
    >>> [r["gold"] for r in knowledge_subset(rows, cats, "known", True)[0]]
    ['1', '4']
    >>> len(knowledge_subset(rows, cats, "unknown", True)[0]), len(knowledge_subset(rows, cats, "unknown", False)[0])
    (2, 3)
    """
    known = [r for r, c in zip(rows, categories, strict=True) if c in KNOWN]
    unknown = [r for r, c in zip(rows, categories, strict=True) if c == "Unknown"]
    if not known or not unknown:
        raise ValueError(f"knowledge_{keep} needs both HighlyKnown/MaybeKnown and Unknown items to compare, the split "
                         f"is {split_counts(categories)}; use a task the base model solves in part, or more items")
    chosen = known if keep == "known" else unknown
    size = min(len(known), len(unknown)) if match_size else len(chosen)
    picked = sorted(np.random.default_rng(seed).choice(len(chosen), size=size, replace=False).tolist())
    return [chosen[i] for i in picked], {"split": split_counts(categories), "trained_on": keep, "items": size,
                                         "dropped": len(rows) - size}
