"""The rl strategy: reinforcement learning on the model's own answers, with trl's GRPO trainer.

For each new-task question the model samples a group of answers (rl.grpo.num_generations); the task's
verifier scores each 1 (accepted) or 0; GRPO raises the likelihood of the answers that beat their
group's mean and lowers the others'. No gold answer is imitated: every training token is one the
model sampled itself, which is why RL is expected to forget less than fine-tuning on given targets
(Shenfeld et al. 2025, "RL's razor"). Reads the task's rows (instruction, gold); trains the model in
place (a peft model trains only its adapters). It learns from the task's questions alone, so it combines only with
lora and knowledge_filter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from desta.core.optim import OptimSection, trainer_settings
from desta.posttrain.strategies.base import Strategy, TrainStep, trl_problems
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import GRPOTrainer


@dataclass
class RLSection:
    """GRPO on the model's own sampled answers, the task's verifier as the reward."""

    grpo: dict = field(default_factory=lambda: {"num_generations": 4, "temperature": 1.0, "beta": 0.0,
                                                "max_completion_length": 96})
    """trl GRPOConfig settings (learning rate, steps and batch come from optim, or from lora.lr with lora); the
    reward is 1 when the task's verifier accepts the sampled answer, else 0"""


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a trl completion: a string, or (chat prompts) a list of messages whose last is the answer.

    >>> completion_text([{"role": "assistant", "content": "It is 5."}]), completion_text("It is 5.")
    ('It is 5.', 'It is 5.')
    """
    return completion if isinstance(completion, str) else completion[-1]["content"]


def verifier_reward(verifier: Verifier, golds: list[Any]) -> Callable[..., list[float]]:
    """A trl reward function: 1.0 for each completion the verifier accepts against the gold of its row (the
    `item` column: an index into `golds`, so golds of any type stay out of the Arrow table), else 0.0.

    >>> from desta.posttrain.verifiers import last_number
    >>> reward = verifier_reward(last_number, ["5", "7"])
    >>> reward(completions=[[{"role": "assistant", "content": "So 5."}], [{"role": "assistant", "content": "6"}]],
    ...        item=[0, 1])
    [1.0, 0.0]
    """
    def reward(completions: list, item: list[int], **_: Any) -> list[float]:
        return [float(verifier(completion_text(c), golds[i])[0]) for c, i in zip(completions, item, strict=True)]

    reward.__name__ = "verifier"  # trl logs rewards/<name>
    return reward


def grpo_dataset(rows: list[dict]) -> Dataset:
    """The task's rows as trl prompts: a one-turn chat per question, and the row's index for the reward.

    >>> grpo_dataset([{"instruction": "2 + 3?", "answer": "5", "gold": "5"}])[0]
    {'prompt': [{'role': 'user', 'content': '2 + 3?'}], 'item': 0}
    """
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "item": i}
                              for i, r in enumerate(rows)])


def generating_in_autocast(trainer_class: type) -> type:
    """A subclass of a trl trainer that samples (`_generate_single_turn`) each batch under one autocast region when
    it trains in bf16 or fp16; a trainer without that hook is returned unchanged.

    trl generates with the model's forward, which accelerate wraps in autocast call by call: outside an enclosing
    region every decoding step casts every float32 weight again. One region round the whole generation lets
    autocast cast each trainable weight once (its cache ends with the region, before the weights change): the
    same samples, about a fifth less time per GRPO step on a CPU (SmolLM2-135M, 8 answers of 64 tokens).
    """
    if not hasattr(trainer_class, "_generate_single_turn"):
        return trainer_class

    class Trainer(trainer_class):
        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            if dtype is None:
                return super()._generate_single_turn(*args, **kwargs)
            with torch.autocast(self.accelerator.device.type, dtype=dtype):
                return super()._generate_single_turn(*args, **kwargs)

    return Trainer


def grpo_trainer_class() -> type[GRPOTrainer]:
    """trl's GRPO trainer, sampling each batch of answers under one autocast region (`generating_in_autocast`)."""
    from trl import GRPOTrainer

    return generating_in_autocast(GRPOTrainer)


def train_grpo(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], verifier: Verifier,
               optim: OptimSection, learning_rate: float, settings: dict[str, Any], output_dir: str,
               logging_steps: int = 5) -> GRPOTrainer:
    """Train `model` with GRPO on `rows` (steps, batch, schedule and seed from `optim`; `settings`: further
    GRPOConfig keys, e.g. num_generations); returns the trainer, its log history included."""
    from trl import GRPOConfig

    args = GRPOConfig(**trainer_settings(optim, output_dir, learning_rate=learning_rate, logging_steps=logging_steps,
                                         save_strategy="no", report_to=[], disable_tqdm=True,
                                         gradient_checkpointing=optim.gradient_checkpointing, **settings))
    reward = verifier_reward(verifier, [r["gold"] for r in rows])
    trainer = grpo_trainer_class()(model=model, reward_funcs=reward, args=args, train_dataset=grpo_dataset(rows),
                                   processing_class=tokenizer)
    trainer.train()
    return trainer


def train(step: TrainStep) -> tuple[Any, dict[str, Any]]:
    """GRPO on the step's rows (`train_grpo`); notes: the first and last logged reward."""
    trainer = train_grpo(step.model, step.tokenizer, step.rows, step.verifier, step.config.optim, step.lr,
                         step.config.rl.grpo, str(step.scratch))
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return trainer, {"rl_reward_first_last": [round(rewards[0], 3), round(rewards[-1], 3)]} if rewards else {}


def problems(config: Any) -> list[tuple[str, str]]:
    """rl.grpo's keys that trl's GRPOConfig lacks, and a group size that does not divide the batch."""
    found = trl_problems(config.rl.grpo, "rl.grpo", "GRPOConfig")
    group, optim = config.rl.grpo.get("num_generations", 8), config.optim  # 8: trl's default
    if isinstance(group, int) and (optim.batch_size * optim.grad_accum) % group:
        found.append(("rl.grpo", f"num_generations {group} must divide optim.batch_size x grad_accum "
                                 f"({optim.batch_size} x {optim.grad_accum}): each batch holds whole groups of answers "
                                 "to one question"))
    return found


STRATEGY = Strategy("rl", "GRPO on the model's own sampled answers, the task's verifier as the reward",
                    section=RLSection, combines=("lora", "knowledge_filter"),
                    combines_why="learns from its own samples of the task's questions", trainer=train, check=problems)
