"""replay_kl: self-generated replay with a KL to the base model (Marek et al. 2026, arXiv 2605.26097). The new
task's rows plus Magpie or BOS pseudo-replay rows (desta.posttrain.strategies.magpie and .bos_replay) at
replay.ratio; the usual loss on every row, plus replay_kl.weight x KL(base || model) over the replay rows' target
tokens, against a frozen copy of the base model. Plain replay imitates the one text the base model sampled; the KL
matches its whole next-token distribution there.

Reads tokenised examples, each replay row's marked "kl"; trains the model in place (a peft model trains only its
adapters); the base copy never changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from desta.core.args import raise_problems
from desta.core.replay import mix
from desta.core.sequences import IGNORE_INDEX
from desta.posttrain.examples import TextCollator
from desta.posttrain.strategies.base import DataStep, Strategy, TrainStep, first_last, nonempty, train_on_examples
from desta.posttrain.strategies.bos_replay import bos_replay_rows
from desta.posttrain.strategies.magpie import magpie_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Trainer


@dataclass
class ReplayKLSection:
    """Self-generated replay rows with a KL to the frozen base model."""

    source: Literal["magpie", "bos"] = "magpie"
    """the self-generated replay rows: Magpie (instructions and answers from the bare user header, magpie.*) or texts
    sampled from the beginning of sequence (bos_replay.*)"""
    weight: float = 1.0
    """weight of KL(base || model) on the replay rows' target tokens, added to the loss"""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise_problems([("weight", f"must be 0 or more, got {self.weight}")])


class KLCollator(TextCollator):
    """Examples (desta.posttrain.examples.encode), each with a "kl" flag (1: a replay row) -> TextCollator's batch plus
    kl_rows (batch,).

    >>> batch = KLCollator(0)([{"input_ids": [5, 6], "labels": [-100, 6], "kl": 1}, {"input_ids": [7], "labels": [7]}])
    >>> batch["kl_rows"].tolist(), batch["labels"].tolist()
    ([1, 0], [[-100, 6], [7, -100]])
    """

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Examples -> input_ids, attention_mask, labels (batch, longest) and kl_rows (batch,)."""
        batch = super().__call__(examples)
        batch["kl_rows"] = torch.tensor([int(e.get("kl", 0)) for e in examples])
        return batch


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || model) per target token, in nats: logits and base_logits (rows, tokens, vocab), labels
    (rows, tokens) with IGNORE_INDEX where no token is predicted; the logits at t predict the label at t + 1.

    >>> logits = torch.zeros(1, 3, 2)
    >>> base = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    >>> round(float(kl_to_base(logits, base, torch.tensor([[-100, 1, 0]]))), 4)  # (0 + KL([.88, .12] || [.5, .5])) / 2
    0.1639
    """
    mask = labels[:, 1:] != IGNORE_INDEX  # (rows, tokens - 1)
    if not mask.any():
        return logits.new_zeros((), dtype=torch.float32)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[mask]  # (targets, vocab)
    base_logp = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)[mask]
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean()


@functools.cache
def kl_trainer_class() -> type[Trainer]:
    """transformers' Trainer whose loss adds `weight` x `kl_to_base` on the batch's replay rows (kl_rows), the base
    logits coming from `base` (frozen, never trained); `kl_log` keeps each step's KL. Made on first use: importing
    the Trainer takes seconds a command's help should not wait for."""
    from transformers import Trainer

    class KLTrainer(Trainer):
        def __init__(self, *args: Any, base: PreTrainedModel, weight: float, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.base, self.weight, self.kl_log = base.eval().requires_grad_(False), weight, []

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            """The Trainer's loss on every row, plus weight x KL(base || model) on the replay rows."""
            rows = inputs.pop("kl_rows").bool()
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if rows.any():
                with torch.no_grad():
                    base_logits = self.base(input_ids=inputs["input_ids"][rows],
                                            attention_mask=inputs["attention_mask"][rows]).logits
                kl = kl_to_base(outputs.logits[rows], base_logits, inputs["labels"][rows])
                self.kl_log.append(float(kl.detach()))
                loss = loss + self.weight * kl
            return (loss, outputs) if return_outputs else loss

    return KLTrainer


def mix_marked(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with self-written replay rows (replay_kl.source), each marked "kl", mixed in at replay.ratio."""
    source = "magpie" if step.config.replay_kl.source == "magpie" else "bos_replay"
    pseudo, step.notes["replay_kl_dropped"] = magpie_rows(step) if source == "magpie" else bos_replay_rows(step)
    pseudo = [{**r, "kl": True} for r in nonempty(pseudo, source, step.notes["replay_kl_dropped"])]
    rows = mix(rows, pseudo, step.config.replay.ratio, step.seed)
    step.notes["replay_kl_rows"] = len(pseudo)
    return rows


def train(step: TrainStep) -> tuple[Any, dict[str, Any]]:
    """`kl_trainer_class` on the step's examples against its frozen base; notes: the first and last logged KL."""
    trainer = train_on_examples(step, kl_trainer_class(), KLCollator(step.pad_id), base=step.base,
                                weight=step.config.replay_kl.weight)
    return trainer, {"replay_kl_first_last": first_last(trainer.kl_log)}


STRATEGY = Strategy("replay_kl", "self-written replay rows with a KL to the frozen base model on them",
                    section=ReplayKLSection, reads=("replay.ratio", "magpie", "bos_replay"), stage="self_replay",
                    data=mix_marked, trainer=train, needs_base=True)
