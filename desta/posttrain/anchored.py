"""Training anchored to the base model: a divergence from a frozen copy of it is added to the loss, off-policy
on self-generated replay rows (replay_kl) or on-policy on the model's own answers to the new task
(on_policy_distill).

replay_kl (Marek et al. 2026, arXiv 2605.26097): the new task's rows plus Magpie or BOS pseudo-replay rows
(desta.posttrain.strategies), the usual loss on every row, plus replay_kl_weight x KL(base || model) over the
replay rows' target tokens. Plain replay imitates the one text the base model sampled; the KL matches its whole
next-token distribution there.

on_policy_distill (GKD: Agarwal et al., ICLR 2024; trl's DistillationTrainer): for each batch of new-task
questions the model samples answers; the frozen base model, as the teacher, scores every sampled token, and the
generalized Jensen-Shannon divergence between the two next-token distributions (trl's `beta`: 0 forward KL,
1 reverse KL) is added, with distill_weight, to the loss on the gold answers (ms-swift's GKD mixes the two
with `sft_alpha`). The gold answers teach the task; the divergence pulls the model back to the base model
wherever its own answers go.

Reads tokenised examples (replay_kl) or the task's rows (on_policy_distill) and the frozen base copy; trains
the model in place (a peft model trains only its adapters); the base copy never changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from desta.core.optim import OptimSection, trainer_settings
from desta.core.sequences import IGNORE_INDEX, pad_batch
from desta.posttrain.rl import generating_in_autocast
from desta.posttrain.strategies import TextCollator

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DistillationTrainer


# ----- replay_kl -----

class KLCollator(TextCollator):
    """Examples from `encode`, each with a "kl" flag (1: a replay row) -> TextCollator's batch plus kl_rows (batch,).

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


class KLTrainer(Trainer):
    """transformers' Trainer whose loss adds `weight` x `kl_to_base` on the batch's replay rows (kl_rows), the base
    logits coming from `base` (frozen, never trained); `kl_log` keeps each step's KL."""

    def __init__(self, *args: Any, base: PreTrainedModel, weight: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.base, self.weight, self.kl_log = base.eval().requires_grad_(False), weight, []

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss on every row, plus weight x KL(base || model) on the replay rows."""
        rows = inputs.pop("kl_rows").bool()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if rows.any():
            with torch.no_grad():
                base_logits = self.base(input_ids=inputs["input_ids"][rows],
                                        attention_mask=inputs["attention_mask"][rows]).logits
            kl = kl_to_base(outputs.logits[rows], base_logits, inputs["labels"][rows])
            self.kl_log.append(float(kl.detach()))
            loss = loss + self.weight * kl
        return (loss, outputs) if return_outputs else loss


# ----- on_policy_distill -----

def distill_dataset(rows: list[dict], examples: list[dict]) -> Dataset:
    """The task's rows as trl prompts (a one-turn chat per question) with each row's tokenised gold answer
    (`encode`: sft_ids, sft_labels) for the loss on the gold answers.

    >>> distill_dataset([{"instruction": "2 + 3?"}], [{"input_ids": [1, 2], "labels": [-100, 2]}])[0]
    {'prompt': [{'role': 'user', 'content': '2 + 3?'}], 'sft_ids': [1, 2], 'sft_labels': [-100, 2]}
    """
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "sft_ids": e["input_ids"],
                               "sft_labels": e["labels"]} for r, e in zip(rows, examples, strict=True)])


def distillation_trainer_class() -> type[DistillationTrainer]:
    """trl's DistillationTrainer whose loss also holds the cross-entropy of the batch's gold answers: the loss is
    that plus `divergence_weight` x trl's divergence on the model's own samples (`divergence_log` keeps each step's
    divergence); sampling runs under one autocast region (desta.posttrain.rl.generating_in_autocast)."""
    from trl import DistillationTrainer

    class Trainer(generating_in_autocast(DistillationTrainer)):
        divergence_weight = 1.0

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            out = super()._generate_and_score_completions(inputs)
            gold = pad_batch([x["sft_ids"] for x in inputs], self._tokenizer.pad_token_id, "right",
                             labels=[x["sft_labels"] for x in inputs])
            device = self.accelerator.device
            out.update(sft_input_ids=gold["input_ids"].to(device), sft_attention_mask=gold["attention_mask"].to(device),
                       sft_labels=gold["labels"].to(device))
            return out

        def _compute_loss(self, unwrapped_student: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
            divergence, entropy_sum, valid = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
            gold = unwrapped_student(input_ids=inputs["sft_input_ids"], attention_mask=inputs["sft_attention_mask"],
                                     labels=inputs["sft_labels"]).loss
            self.divergence_log.append(float(divergence.detach()))
            return gold + self.divergence_weight * divergence, entropy_sum, valid

    return Trainer


def train_on_policy_distill(model: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                            rows: list[dict], examples: list[dict], optim: OptimSection, learning_rate: float,
                            settings: dict[str, Any], weight: float, output_dir: str,
                            logging_steps: int = 5) -> DistillationTrainer:
    """Train `model` on the task's gold answers (`examples`, from `encode`) plus `weight` x the divergence from
    `teacher` (the frozen base model) on its own samples of the rows' questions; steps, batch, schedule and seed
    from `optim`; `settings`: further DistillationConfig keys. Returns the trainer (its log history included)."""
    from trl import DistillationConfig

    args = DistillationConfig(**trainer_settings(optim, output_dir, learning_rate=learning_rate,
                                                 logging_steps=logging_steps, save_strategy="no", report_to=[],
                                                 disable_tqdm=True, gradient_checkpointing=optim.gradient_checkpointing,
                                                 **settings))  # trl's default checkpoints: a third more compute
    trainer_class = distillation_trainer_class()
    trainer = trainer_class(model=model, teacher_model=teacher.eval().requires_grad_(False), args=args,
                            train_dataset=distill_dataset(rows, examples), processing_class=tokenizer)
    trainer.divergence_weight, trainer.divergence_log = weight, []
    trainer.train()
    return trainer
