"""knowledge_known: training on the items the base model already answers (HighlyKnown and MaybeKnown), as many as
knowledge_unknown trains on (knowledge.match_size): Gekhman et al. (EMNLP 2024) predict these help and Unknown ones
hurt. The split is judged once per output folder and shared with knowledge_unknown (OUT/base/knowledge-*.json)."""

from __future__ import annotations

import json
from typing import Literal

from desta.core.chunks import write_atomic
from desta.core.digests import fingerprint
from desta.posttrain.knowledge import knowledge_split, knowledge_subset
from desta.posttrain.strategies.base import DataStep, Strategy

SPLIT_SETTINGS = ("knowledge.shots", "knowledge.samples", "knowledge.temperature", "knowledge.match_size")


def cached_split(step: DataStep, rows: list[dict]) -> list[str]:
    """The knowledge split of `rows` (desta.posttrain.knowledge), kept in step.cache (OUT/base, cleared whenever the
    base model is measured again) under a name made of every setting it depends on, so knowledge_known and
    knowledge_unknown judge the base model's answers once."""
    config, section = step.config, step.config.knowledge
    depends = {"rows": rows, "shots": section.shots, "samples": section.samples, "temperature": section.temperature,
               "seed": step.seed, "tokens": config.eval_max_new_tokens, "precision": config.optim.precision,
               "batch": config.generation_batch_size}
    path = step.cache / f"knowledge-{fingerprint(depends)[:16]}.json" if step.cache else None
    if path and path.is_file():
        return json.loads(path.read_text())
    categories = knowledge_split(step.backend, rows, step.verifier, section.shots, section.samples,
                                 section.temperature, step.seed, config.eval_max_new_tokens)
    if path:
        write_atomic(path, json.dumps(categories))
    return categories


def split_part(step: DataStep, rows: list[dict], keep: Literal["known", "unknown"]) -> list[dict]:
    """The rows of one side of the knowledge split (`knowledge_subset`); every row with its category under
    notes["knowledge"]["rows"]."""
    categories = cached_split(step, rows)
    step.notes["knowledge"] = {"rows": [{**r, "knowledge": c} for r, c in zip(rows, categories, strict=True)]}
    rows, counts = knowledge_subset(rows, categories, keep, step.config.knowledge.match_size, step.seed)
    step.notes["knowledge"].update(counts)
    return rows


STRATEGY = Strategy("knowledge_known", "trains on the items the base model already answers", reads=SPLIT_SETTINGS,
                    stage="select", data=lambda step, rows: split_part(step, rows, "known"))
