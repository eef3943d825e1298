"""self_distill: on-policy self-distillation. The model answers each question (greedy), then, shown the gold answer,
rewrites its own answer; the target is the rewrite if it verifies, else its own answer if that does, else the
gold."""

from __future__ import annotations

from typing import TYPE_CHECKING

from desta.core.generation import Generation, SamplingSettings
from desta.posttrain.strategies.base import DataStep, Strategy
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from desta.core.generation import TransformersBackend

SELF_DISTILL_PROMPT = ("Question:\n{question}\n\nYour earlier answer:\n{own}\n\nA correct reference answer:\n{gold}"
                       "\n\nRewrite your earlier answer so that it is correct. Keep your own words and steps wherever "
                       "they are right. Reply with the answer only.")


def keep_self_distilled(row: dict, own: Generation, rewrite: Generation, verifier: Verifier) -> tuple[str, str]:
    """The self-distillation target of a row and where it came from: the rewrite if it finished and verifies,
    else the model's own answer if that verifies, else the gold answer.

    >>> row = {"instruction": "2 + 3?", "answer": "2 + 3 = 5. The answer is 5.", "gold": "5"}
    >>> from desta.posttrain.verifiers import last_number
    >>> keep_self_distilled(row, Generation("It is 6.", "stop", 4), Generation("It is 5.", "stop", 4), last_number)
    ('It is 5.', 'rewrite')
    """
    if rewrite.finish_reason == "stop" and rewrite.text and verifier(rewrite.text, row["gold"])[0]:
        return rewrite.text, "rewrite"
    if own.finish_reason == "stop" and own.text and verifier(own.text, row["gold"])[0]:
        return own.text, "own answer"
    return row["answer"], "gold"


def self_distill(backend: TransformersBackend, rows: list[dict], verifier: Verifier,
                 max_new_tokens: int = 160) -> tuple[list[dict], dict[str, int]]:
    """Self-distillation: the model answers each question (greedy), then, shown the gold answer, rewrites its own
    answer; the target is chosen by `keep_self_distilled`."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    own = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows], settings)
    rewrites = backend.generate([[{"role": "user", "content": SELF_DISTILL_PROMPT.format(
        question=r["instruction"], own=o.text, gold=r["answer"])}] for r, o in zip(rows, own, strict=True)], settings)
    counts = {"rewrite": 0, "own answer": 0, "gold": 0}
    out = []
    for row, answer, rewrite in zip(rows, own, rewrites, strict=True):
        target, source = keep_self_distilled(row, answer, rewrite, verifier)
        counts[source] += 1
        out.append({**row, "answer": target})
    return out, counts


def self_distilled(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with self-distilled targets."""
    rows, step.notes["self_distill"] = self_distill(step.backend, rows, step.verifier,
                                                    step.config.answer_max_new_tokens)
    return rows


STRATEGY = Strategy("self_distill", "the model rewrites its own answer with the gold one in view", stage="targets",
                    data=self_distilled)
