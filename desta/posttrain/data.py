"""The data step of a `desta posttrain` run: the rows and tokenised examples it trains on, and notes on what each
strategy's data transform did. Starts from the new task's training rows; each of the run's data transforms runs at
its stage (desta.posttrain.strategies.base.STAGES: select, pairs, targets, self_replay, replay, then labels on the
tokenised examples). Reads the rows, the base model (generating) and, for knowledge_known and knowledge_unknown,
the knowledge split kept in OUT/base; writes only that split.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.posttrain.examples import encode
from desta.posttrain.strategies import data_order
from desta.posttrain.strategies.base import DataStep
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from desta.core.generation import TransformersBackend
    from desta.posttrain.config import PostTrainConfig


def strategy_data(parts: Iterable[str], backend: TransformersBackend, config: PostTrainConfig,
                  train_rows: list[dict], replay_rows: list[dict], verifier: Verifier,
                  cache: Path | None = None) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The rows and tokenised examples a run of these strategies (`parts`) trains on, and notes on what their
    transforms did (the knowledge split's labelled rows under notes["knowledge"]["rows"]). Preference pairs (stage
    pairs: self_align) have no examples: DPO tokenises them. A row marked "kl" (replay_kl's replay rows) gives an
    example marked so: the KL applies there."""
    step = DataStep(backend, config, verifier, replay_rows, cache)
    transforms = data_order(parts)
    rows = list(train_rows)
    for record in transforms:
        if record.stage != "labels":
            rows = record.data(step, rows)
    if any(record.stage == "pairs" for record in transforms):
        return rows, [], step.notes
    examples = [{**encode(backend.tokenizer, r, config.style, config.max_length), **({"kl": 1} if r.get("kl") else {})}
                for r in rows]
    for record in transforms:
        if record.stage == "labels":
            examples = record.data(step, examples)
    return rows, examples, step.notes
