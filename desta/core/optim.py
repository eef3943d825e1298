"""The optimisation settings both training commands share, and the transformers Trainer arguments
built from them: one precision rule, one schedule, one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from desta.core.args import raise_problems

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import TrainingArguments

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class OptimSection:
    """How to optimise."""

    lr: float = 1e-4
    """peak learning rate (the papers: 1e-4)"""
    warmup_steps: int = 2000
    """linear warm-up steps before the decay (DeSTA2: 2000, DeSTA2.5: 5000)"""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """after the warm-up: cosine decay (the papers), constant, or linear decay to 0"""
    min_lr_ratio: float = 0.0
    """where the decay ends, as a share of lr (0: at zero, as transformers' cosine; a run whose rate reaches 0
    early stops learning there)"""
    max_steps: int = -1
    """optimizer steps to run; -1: run `epochs`"""
    epochs: float = 5.0
    """passes over the training data when max_steps is -1"""
    batch_size: int = 12
    """rows per device per step (DeSTA2.5: 12 on each of 8 GPUs)"""
    grad_accum: int = 1
    """optimizer step every N batches; effective batch = batch_size x grad_accum x devices"""
    weight_decay: float = 0.0
    """AdamW weight decay (DeSTA2/2.5: 0.01)"""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay"""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (DeSTA2/2.5: 0.98: a shorter memory of gradient scale)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    precision: Precision = "auto"
    """auto (bf16 on a GPU that has it, else fp32), fp32, bf16 (GPU, or CPU autocast; `desta posttrain` also
    generates under it), fp16 (GPU only)"""
    gradient_checkpointing: bool = False
    """recompute the LLM's activations in the backward pass: less memory, about a third more compute"""
    seed: int = 42
    """data order, initialisation and sampling depend only on it"""

    def __post_init__(self) -> None:
        problems = []
        if not self.lr > 0:
            problems.append(("lr", f"must be positive, got {self.lr}"))
        if self.warmup_steps < 0:
            problems.append(("warmup_steps", f"must be 0 or more, got {self.warmup_steps}"))
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(("min_lr_ratio", f"is a share of lr, in [0, 1]; got {self.min_lr_ratio}"))
        elif self.min_lr_ratio > 0 and self.schedule != "cosine":
            problems.append(("min_lr_ratio", f"sets where the cosine decay ends; schedule is {self.schedule!r}: set "
                                             "schedule=cosine or min_lr_ratio=0"))
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(("max_steps", f"must be -1 (run `epochs`) or at least 1, got {self.max_steps}"))
        if self.max_steps == -1 and not self.epochs > 0:
            problems.append(("epochs", f"must be positive when max_steps is -1, got {self.epochs}"))
        if self.batch_size < 1 or self.grad_accum < 1:
            problems.append(("batch_size", f"batch_size and grad_accum must be at least 1, got {self.batch_size} "
                                           f"and {self.grad_accum}"))
        if self.weight_decay < 0 or not self.max_grad_norm > 0:
            problems.append(("weight_decay", f"weight_decay must be 0 or more and max_grad_norm positive, got "
                                             f"{self.weight_decay} and {self.max_grad_norm}"))
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            problems.append(("adam_beta2", f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1} and "
                                           f"{self.adam_beta2}"))
        if self.precision == "fp16" and not torch.cuda.is_available():
            problems.append(("precision", "fp16 needs a CUDA GPU; use fp32, bf16 or auto on a CPU"))
        raise_problems(problems)


def resolved_precision(choice: Precision, gpu: bool | None = None) -> Literal["fp32", "bf16", "fp16"]:
    """The precision a setting computes in: auto is bf16 on a CUDA GPU that has it, else fp32. `gpu`: assume such a
    GPU (True, as `desta plan` does) or not; None: look at this machine.

    >>> resolved_precision("auto", gpu=True), resolved_precision("auto", gpu=False), resolved_precision("fp16")
    ('bf16', 'fp32', 'fp16')
    """
    if choice != "auto":
        return choice
    if gpu is None:
        gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if gpu else "fp32"


def precision_flags(choice: Precision) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags for a precision setting."""
    precision = resolved_precision(choice)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def schedule_settings(optim: OptimSection) -> dict[str, Any]:
    """TrainingArguments' scheduler keywords for the schedule setting.

    >>> schedule_settings(OptimSection(schedule="cosine", min_lr_ratio=0.1))
    {'lr_scheduler_type': 'cosine_with_min_lr', 'lr_scheduler_kwargs': {'min_lr_rate': 0.1}}
    >>> schedule_settings(OptimSection(schedule="constant"))
    {'lr_scheduler_type': 'constant_with_warmup'}
    """
    if optim.schedule == "constant":
        return {"lr_scheduler_type": "constant_with_warmup"}
    if optim.min_lr_ratio > 0:  # validated: only with cosine
        return {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": optim.min_lr_ratio}}
    return {"lr_scheduler_type": optim.schedule}


def trainer_settings(optim: OptimSection, output_dir: str, **extra: Any) -> dict[str, Any]:
    """TrainingArguments keywords for these settings: AdamW, cosine schedule with warm-up, clipping, precision,
    CPU when there is no GPU; `extra` adds or replaces keywords. trl's configs take the same keywords."""
    settings: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size, gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2, **schedule_settings(optim),
        warmup_steps=optim.warmup_steps, max_steps=optim.max_steps, num_train_epochs=optim.epochs,
        max_grad_norm=optim.max_grad_norm, seed=optim.seed, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), **precision_flags(optim.precision))
    settings.update(extra)
    return settings


def training_arguments(optim: OptimSection, output_dir: str, **extra: Any) -> TrainingArguments:
    """transformers TrainingArguments for these settings (`trainer_settings`); `extra` adds or replaces arguments."""
    from transformers import TrainingArguments

    return TrainingArguments(**trainer_settings(optim, output_dir, **extra))


def process_state() -> PartialState:
    """accelerate's state of this process: its rank among the processes of `accelerate launch` or torchrun (the
    process group started on first use), on the CPU where there is no GPU, as the Trainer's arguments start it."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
