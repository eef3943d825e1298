"""The new task to learn (built-in arithmetic word problems, or JSONL files) and the replay set that
stands for the model's old training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from desta.core.chunks import read_jsonl
from desta.core.generation import Backend, SamplingSettings
from desta.posttrain.config import TaskSection

# General requests whose answers by the base model form the default replay set (old-task stand-in).
GENERAL_PROMPTS = [
    "Give me three tips for a good night's sleep.", "What is photosynthesis? Explain briefly.",
    "Write a short, friendly email declining a meeting invitation.", "Name three famous painters and one work each.",
    "How do I boil an egg?", "Summarize the plot of Little Red Riding Hood in two sentences.",
    "What are the primary colours?", "Suggest a name for a bakery.", "Why do leaves change colour in autumn?",
    "List four ways to stay focused while studying.", "What does a librarian do?",
    "Translate 'good morning' into French and Spanish.", "Describe the water cycle in simple words.",
    "Give two reasons people keep dogs as pets.", "What is the difference between weather and climate?",
    "Write a haiku about the sea.",
]


def arithmetic_task(size: int, seed: int) -> list[dict[str, str]]:
    """Two- and three-number word problems with worked answers ending in the result.

    >>> arithmetic_task(1, 0)[0]["answer"].split()[-1].rstrip(".").isdigit()
    True
    """
    rng = np.random.default_rng(seed)
    items = ["apples", "books", "marbles", "stamps", "coins", "pencils", "shells", "cards"]
    names = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo"]
    rows = []
    for _ in range(size):
        a, b, c = (int(x) for x in rng.integers(12, 90, size=3))
        name, item = str(rng.choice(names)), str(rng.choice(items))
        if rng.random() < 0.5:
            question = f"{name} has {a} {item}, buys {b} more and gives away {c}. How many {item} are left?"
            result = a + b - c
            work = f"{a} + {b} = {a + b}, then {a + b} - {c} = {result}."
        else:
            question = f"{name} packs {a} {item} into each of {b % 9 + 2} boxes. How many {item} in total?"
            result = a * (b % 9 + 2)
            work = f"{a} x {b % 9 + 2} = {result}."
        rows.append({"instruction": question + " Show the calculation, then give the result.",
                     "answer": f"{work} The answer is {result}.", "gold": str(result)})
    return rows


def read_rows(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSONL file that each hold an instruction and an answer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found; give a JSONL file with instruction and answer "
                                "columns")
    rows = read_jsonl(path)
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not r.get("instruction") or "answer" not in r]
    if bad or not rows:
        raise ValueError(f"{path}: every row needs instruction and answer ({len(bad)} of {len(rows)} do not, e.g. "
                         f"line {bad[0] + 1 if bad else 1})")
    return rows


def load_task(task: TaskSection) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each with instruction, answer and gold."""
    if task.kind == "arithmetic":
        rows = arithmetic_task(task.train_size + task.eval_size, task.seed)
        return rows[: task.train_size], rows[task.train_size :]
    train, held_out = (read_rows(path, f"task.{name}") for name, path in (("train", task.train),
                                                                            ("eval", task.eval)))
    return ([{**r, "gold": r.get("gold", r["answer"])} for r in train],
            [{**r, "gold": r.get("gold", r["answer"])} for r in held_out])


def replay_set(backend: Backend, max_new_tokens: int) -> list[dict]:
    """The default replay set, standing for old-task rows: the base model's own answers to general requests."""
    answers = backend.generate([[{"role": "user", "content": p}] for p in GENERAL_PROMPTS],
                               SamplingSettings(max_new_tokens=max_new_tokens))
    return [{"instruction": p, "answer": a.text} for p, a in zip(GENERAL_PROMPTS, answers, strict=True)]
