"""token_filter: no loss on target tokens the base model finds very unlikely (STM, NeurIPS 2025): a token whose
probability under the base model is below token_filter.threshold gets label -100."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from desta.core.args import raise_problems
from desta.core.sequences import IGNORE_INDEX
from desta.posttrain.strategies.base import DataStep, Strategy

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class TokenFilterSection:
    """No loss on the target tokens the base model finds very unlikely."""

    threshold: float = 0.4
    """target tokens whose base-model probability is below this get no loss"""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise_problems([("threshold", f"must be in (0, 1), got {self.threshold}")])


@torch.no_grad()
def filter_tokens(llm: PreTrainedModel, examples: list[dict], threshold: float) -> tuple[list[dict], float]:
    """Token filtering: a target token whose probability under the base model is below `threshold`
    gets label -100. Returns the new examples and the share of target tokens masked."""
    masked = total = 0
    out = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]], device=llm.device)
        probs = llm(input_ids=ids).logits[0, :-1].float().softmax(-1)
        labels = list(example["labels"])
        for position in range(1, len(labels)):
            if labels[position] == IGNORE_INDEX:
                continue
            total += 1
            if float(probs[position - 1, labels[position]]) < threshold:
                labels[position] = IGNORE_INDEX
                masked += 1
        out.append({**example, "labels": labels})
    return out, masked / max(total, 1)


def filtered(step: DataStep, examples: list[dict]) -> list[dict]:
    """The examples with the unlikely target tokens masked."""
    examples, step.notes["token_filter_masked_share"] = filter_tokens(step.backend.llm, examples,
                                                                      step.config.token_filter.threshold)
    return examples


STRATEGY = Strategy("token_filter", "no loss on target tokens the base model finds very unlikely",
                    section=TokenFilterSection, stage="labels", data=filtered)
