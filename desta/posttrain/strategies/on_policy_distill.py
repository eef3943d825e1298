"""on_policy_distill: on-policy distillation from the base model (GKD: Agarwal et al., ICLR 2024; trl's
DistillationTrainer). For each batch of new-task questions the model samples answers; the frozen base model, as the
teacher, scores every sampled token, and the generalized Jensen-Shannon divergence between the two next-token
distributions (trl's `beta`: 0 forward KL, 1 reverse KL) is added, with on_policy_distill.weight, to the loss on the
gold answers (ms-swift's GKD mixes the two with `sft_alpha`). The gold answers teach the task; the divergence pulls
the model back to the base model wherever its own answers go.

Reads the task's rows and their tokenised gold answers; trains the model in place (a peft model trains only its
adapters); the teacher never changes. It trains with a trainer of its own, so it combines only with lora and
rule_adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from desta.core.args import raise_problems
from desta.core.optim import OptimSection, trainer_settings
from desta.core.sequences import pad_batch
from desta.posttrain.strategies.base import Strategy, TrainStep, first_last, trl_problems
from desta.posttrain.strategies.rl import generating_in_autocast

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DistillationTrainer


@dataclass
class OnPolicyDistillSection:
    """The gold answers plus a divergence from the frozen base model on the model's own samples."""

    distill: dict = field(default_factory=lambda: {"beta": 1.0, "temperature": 1.0, "max_completion_length": 96})
    """trl DistillationConfig settings (beta 0: forward KL, 1: reverse KL; the answers the model samples to the new
    task's questions are scored by the frozen base model)"""
    weight: float = 1.0
    """weight of the divergence from the base model on the model's own samples, added to the loss on the gold
    answers"""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise_problems([("weight", f"must be 0 or more, got {self.weight}")])


def distill_dataset(rows: list[dict], examples: list[dict]) -> Dataset:
    """The task's rows as trl prompts (a one-turn chat per question) with each row's tokenised gold answer
    (desta.posttrain.examples.encode: sft_ids, sft_labels) for the loss on the gold answers.

    >>> distill_dataset([{"instruction": "2 + 3?"}], [{"input_ids": [1, 2], "labels": [-100, 2]}])[0]
    {'prompt': [{'role': 'user', 'content': '2 + 3?'}], 'sft_ids': [1, 2], 'sft_labels': [-100, 2]}
    """
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "sft_ids": e["input_ids"],
                               "sft_labels": e["labels"]} for r, e in zip(rows, examples, strict=True)])


def distillation_trainer_class() -> type[DistillationTrainer]:
    """trl's DistillationTrainer whose loss also holds the cross-entropy of the batch's gold answers: the loss is
    that plus `divergence_weight` x trl's divergence on the model's own samples (`divergence_log` keeps each step's
    divergence); sampling runs under one autocast region (desta.posttrain.strategies.rl.generating_in_autocast)."""
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
    """Train `model` on the task's gold answers (`examples`, tokenised by desta.posttrain.examples.encode) plus
    `weight` x the divergence from `teacher` (the frozen base model) on its own samples of the rows' questions; steps,
    batch, schedule and seed from `optim`; `settings`: further DistillationConfig keys. Returns the trainer (its log
    history included)."""
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


def train(step: TrainStep) -> tuple[Any, dict[str, Any]]:
    """`train_on_policy_distill` with the step's frozen base as the teacher; notes: the first and last divergence."""
    section = step.config.on_policy_distill
    trainer = train_on_policy_distill(step.model, step.base, step.tokenizer, step.rows, step.examples,
                                      step.config.optim, step.lr, section.distill, section.weight, str(step.scratch))
    return trainer, {"divergence_first_last": first_last(trainer.divergence_log)}


STRATEGY = Strategy("on_policy_distill", "the gold answers plus a divergence from the base model on its own samples",
                    section=OnPolicyDistillSection, combines=("lora", "rule_adapter"),
                    combines_why="trains with a trainer of its own", trainer=train, needs_base=True,
                    check=lambda config: trl_problems(config.on_policy_distill.distill, "on_policy_distill.distill",
                                                      "DistillationConfig"))
