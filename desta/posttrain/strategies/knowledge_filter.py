"""knowledge_filter: training without the items the base model does not know (Gekhman et al., EMNLP 2024). The
training items are split by the base model's own answers (desta.posttrain.knowledge), judged within
eval_max_new_tokens as the task's evaluation reads them; the categories in knowledge.drop are left out."""

from __future__ import annotations

from desta.posttrain.knowledge import knowledge_filter
from desta.posttrain.strategies.base import DataStep, Strategy


def known_rows(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows whose category is not in knowledge.drop; every row with its category under
    notes["knowledge"]["rows"]."""
    section, config = step.config.knowledge, step.config
    # judged as the task's evaluation judges: an answer right only after eval_max_new_tokens is not known
    rows, labelled, step.notes["knowledge"] = knowledge_filter(
        step.backend, rows, step.verifier, section.drop, section.shots, section.samples, section.temperature,
        step.seed, config.eval_max_new_tokens)
    step.notes["knowledge"]["rows"] = labelled
    return rows


STRATEGY = Strategy("knowledge_filter", "leaves out the training items the base model does not know",
                    reads=("knowledge.shots", "knowledge.samples", "knowledge.temperature", "knowledge.drop"),
                    stage="select", data=known_rows)
