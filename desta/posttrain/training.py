"""The training step of a `desta posttrain` run: which trainer each strategy uses, and what it logged.

sft and the data strategies: transformers' Trainer on the tokenised examples; replay_kl: the same with
KL(base || model) on its replay rows (desta.posttrain.anchored); rl: trl's GRPO (desta.posttrain.rl);
self_align: trl's DPO on the model's own preference pairs (desta.posttrain.self_align); on_policy_distill:
trl's distillation trainer with the base model as the teacher (desta.posttrain.anchored); rule_adapter alone
trains nothing. A strategy with lora trains only its adapters. Reads the run's rows and examples and the
model; trains the model in place; writes only the trainer's scratch folder, which it removes.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.posttrain.config import PostTrainConfig
from desta.posttrain.strategies import TextCollator
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NO_TRAINING = {"rule_adapter"}  # parts that change only how the model decodes


def trains(parts: set[str]) -> bool:
    """Whether a strategy of these parts trains at all (rule_adapter alone does not).

    >>> trains({"rule_adapter"}), trains({"sft", "rule_adapter"})
    (False, True)
    """
    return bool(parts - NO_TRAINING)


def first_last(values: list[float]) -> list[float] | None:
    """The first and last of a logged series, rounded; None when nothing was logged.

    >>> first_last([0.0, 0.123456, 0.5]), first_last([])
    ([0.0, 0.5], None)
    """
    return [round(values[0], 4), round(values[-1], 4)] if values else None


def train_model(parts: set[str], llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                examples: list[dict], config: PostTrainConfig, verifier: Verifier, pad_id: int,
                scratch: Path) -> tuple[Any, list[float], dict[str, Any]]:
    """Train `llm` (or LoRA adapters on it) as the strategy's parts say; returns the trained model, the logged
    training losses and notes (e.g. the first and last KL to the base model)."""
    from transformers import Trainer

    from desta.core.optim import training_arguments

    if not trains(parts):
        return llm, [], {}
    # the frozen base model the anchored strategies compare with: copied before LoRA wraps the model in place
    base = copy.deepcopy(llm).eval().requires_grad_(False) if parts & {"replay_kl", "on_policy_distill"} else None
    model, lr = llm, config.optim.lr
    if "lora" in parts:
        from peft import LoraConfig, get_peft_model

        model, lr = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **config.lora)), config.lora_lr
    notes: dict[str, Any] = {}
    if "rl" in parts:
        from desta.posttrain.rl import train_grpo

        trainer = train_grpo(model, tokenizer, rows, verifier, config.optim, lr, config.grpo, str(scratch))
        rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
        if rewards:
            notes["rl_reward_first_last"] = [round(rewards[0], 3), round(rewards[-1], 3)]
    elif "self_align" in parts:
        from desta.posttrain.self_align import train_dpo

        trainer = train_dpo(model, tokenizer, rows, config.optim, config.self_align_lr or lr, config.dpo, str(scratch))
        notes["dpo_margin_first_last"] = first_last([r["rewards/margins"] for r in trainer.state.log_history
                                                     if "rewards/margins" in r])
    elif "on_policy_distill" in parts:
        from desta.posttrain.anchored import train_on_policy_distill

        assert base is not None
        trainer = train_on_policy_distill(model, base, tokenizer, rows, examples, config.optim, lr, config.distill,
                                          config.distill_weight, str(scratch))
        notes["divergence_first_last"] = first_last(trainer.divergence_log)
    else:
        args = training_arguments(config.optim, str(scratch), learning_rate=lr, logging_steps=5,
                                  save_strategy="no", report_to=[], disable_tqdm=True)
        if "replay_kl" in parts:
            from desta.posttrain.anchored import KLCollator, KLTrainer

            assert base is not None
            trainer = KLTrainer(model=model, args=args, train_dataset=examples, data_collator=KLCollator(pad_id),
                                base=base, weight=config.replay_kl_weight)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=TextCollator(pad_id))
        trainer.train()
        if "replay_kl" in parts:
            notes["replay_kl_first_last"] = first_last(trainer.kl_log)
    shutil.rmtree(scratch, ignore_errors=True)
    return model, [r["loss"] for r in trainer.state.log_history if "loss" in r], notes
