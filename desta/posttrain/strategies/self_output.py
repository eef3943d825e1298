"""self_output: the model's own answers as targets (Selective Self-Rehearsal / S3FT). It samples k answers per
question; among those the verifier accepts, the one it finds most likely (lowest perplexity) is the target; a
question with none keeps its gold answer, or is dropped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from desta.core.args import raise_problems
from desta.core.generation import Generation, SamplingSettings
from desta.posttrain.examples import answer_nll
from desta.posttrain.strategies.base import DataStep, Strategy
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from desta.core.generation import TransformersBackend


@dataclass
class SelfOutputSection:
    """The model's own verified answers as targets."""

    k: int = 4
    """sampled answers per question"""
    temperature: float = 0.7
    """sampling temperature of self-output answers"""
    fallback: Literal["gold", "drop"] = "gold"
    """questions with no verified answer of the model's own: train on gold, or drop them"""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise_problems([("k", f"must be at least 1, got {self.k}")])


def pick_verified(candidates: list[Generation], gold: Any, verifier: Verifier,
                  nll: Callable[[str], float]) -> str | None:
    """Among finished answers the verifier accepts, the one with the lowest `nll` (perplexity); None if none."""
    verified = [g.text for g in candidates if g.finish_reason == "stop" and g.text and verifier(g.text, gold)[0]]
    return min(verified, key=nll) if verified else None


def self_output(backend: TransformersBackend, rows: list[dict], verifier: Verifier, k: int, temperature: float,
                fallback: Literal["gold", "drop"], seed: int = 0,
                max_new_tokens: int = 160) -> tuple[list[dict], dict[str, int]]:
    """For each question, k sampled answers; verified ones compete on perplexity; else gold or drop."""
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in rows for _ in range(k)]
    samples = backend.generate(conversations, SamplingSettings(max_new_tokens=max_new_tokens,
                                                               temperature=temperature, seed=seed))
    out, counts = [], {"own answer": 0, "gold fallback": 0, "dropped": 0}
    for index, row in enumerate(rows):
        best = pick_verified(samples[index * k : (index + 1) * k], row["gold"], verifier,
                             lambda a, q=row["instruction"]: answer_nll(backend.llm, backend.tokenizer, q, a))
        if best is not None:
            out.append({**row, "answer": best})
            counts["own answer"] += 1
        elif fallback == "gold":
            out.append(row)
            counts["gold fallback"] += 1
        else:
            counts["dropped"] += 1
    return out, counts


def own_answers(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with the model's own verified answers as targets (self_output.*)."""
    section = step.config.self_output
    rows, step.notes["self_output"] = self_output(step.backend, rows, step.verifier, section.k, section.temperature,
                                                  section.fallback, step.seed, step.config.answer_max_new_tokens)
    return rows


STRATEGY = Strategy("self_output", "the model's own verified answers as targets", section=SelfOutputSection,
                    stage="targets", data=own_answers)
