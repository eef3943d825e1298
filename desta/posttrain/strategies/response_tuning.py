"""response_tuning: training on the answers alone (Hewitt et al. 2024, "Instruction following without instruction
tuning"): each task row's instruction is left empty (kept under "question" for reading)."""

from __future__ import annotations

from desta.posttrain.strategies.base import DataStep, Strategy


def answers_alone(step: DataStep, rows: list[dict]) -> list[dict]:
    """The task's answers alone, their instructions left empty.

    >>> answers_alone(None, [{"instruction": "2 + 3?", "answer": "5"}])
    [{'instruction': '', 'answer': '5', 'question': '2 + 3?'}]
    """
    return [{**r, "question": r["instruction"], "instruction": ""} for r in rows]


STRATEGY = Strategy("response_tuning", "the task's answers alone, their instructions left empty", stage="targets",
                    data=answers_alone)
