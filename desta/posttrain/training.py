"""The training step of a `desta posttrain` run: the run's strategies adapt the model (lora wraps it with
adapters), then the one trainer among them trains it (rl: GRPO, self_align: DPO, on_policy_distill: trl's
distillation trainer, replay_kl: a Trainer with a KL to the base model), or transformers' Trainer on the tokenised
examples when none has one (sft and the data strategies); a strategy that trains nothing alone (rule_adapter)
leaves the model as it is. Reads the run's rows and examples and the model; trains the model in place; writes only
the trainer's scratch folder, which it removes.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from desta.posttrain.strategies import records, trains
from desta.posttrain.strategies.base import TrainStep, train_on_examples
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from desta.posttrain.config import PostTrainConfig


def train_examples(step: TrainStep) -> tuple[Any, dict[str, Any]]:
    """The trainer of a run whose strategies have none: transformers' Trainer on the examples; no notes."""
    return train_on_examples(step), {}


def train_model(parts: Iterable[str], llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                examples: list[dict], config: PostTrainConfig, verifier: Verifier, pad_id: int,
                scratch: Path) -> tuple[Any, list[float], dict[str, Any]]:
    """Train `llm` (or LoRA adapters on it) as the run's strategies (`parts`) say; returns the trained model, the
    logged training losses and notes (e.g. the first and last KL to the base model)."""
    used = records(parts)
    if not trains(parts):
        return llm, [], {}
    # the frozen base model the anchored strategies compare with: copied before LoRA wraps the model in place
    base = copy.deepcopy(llm).eval().requires_grad_(False) if any(r.needs_base for r in used) else None
    model, lr = llm, config.optim.lr
    for record in used:
        if record.adapt is not None:
            model, lr = record.adapt(model, config)
    train = next((r.trainer for r in used if r.trainer is not None), train_examples)
    trainer, notes = train(TrainStep(model, base, tokenizer, rows, examples, config, verifier, pad_id, lr, scratch))
    shutil.rmtree(scratch, ignore_errors=True)
    return model, [r["loss"] for r in trainer.state.log_history if "loss" in r], notes
