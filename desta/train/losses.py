"""What `optim.loss` names: one record per training loss (ce, kl, on_policy), chosen by name.

Each record says what a batch must carry (the text LLM's turns or not), how the loss is computed from the logits
of the response positions alone, what it is normalised over (the step's labelled tokens, or its sampled answers)
and what validation reports. The trainer (desta.train.trainer.DestaTrainer) counts the step's units over every
micro-batch of a gradient-accumulation step and every process, and a record divides its sum by that count: the
loss, its gradients and the logged value are the same however the step is split into micro-batches and processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from desta.core.sequences import IGNORE_INDEX, end_of_turn_ids
from desta.model.parts import labelled_logits
from desta.train.on_policy import on_policy_batches, prompts, sample_responses

if TYPE_CHECKING:
    from desta.model.modeling import DestaModel
    from desta.model.processing import DestaProcessor
    from desta.train.config import TrainOptim


@dataclass(frozen=True)
class LossSettings:
    """What the losses read besides the batch: the run's settings and the tokenizer's ids."""

    temperature: float = 1.0  # softens both distributions of the KL (the loss is scaled by its square)
    max_new_tokens: int = 64  # longest answer the student samples (on_policy)
    seed: int = 0  # the student's samples depend on it, the step and the row (on_policy)
    pad_id: int = 0
    end_ids: frozenset[int] = frozenset()  # ids that end an answer


@dataclass
class LossBatch:
    """One micro-batch as the losses see it: the student's rows, the text LLM's turns, the samples' ids, the step."""

    student: dict[str, Any]  # input_ids, attention_mask, labels (batch, seq) and the audio, as the model takes them
    teacher: dict[str, torch.Tensor]  # input_ids, attention_mask, labels of the text LLM's turns; empty for ce
    sample_ids: list[str]
    step: int  # the optimizer step it belongs to (0-based)


# (model, batch, settings, count) -> (loss, the student's outputs); count: the step's units the sum is divided by
LossFunction = Callable[["DestaModel", LossBatch, LossSettings, Any], tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class Loss:
    """One training loss: its name (optim.loss), what the loss plot's axis calls it, whether a batch carries the
    text LLM's turns, the unit it is averaged over, and the functions computing it in training and validation."""

    name: str
    axis: str
    teacher: bool
    per: Literal["token", "answer"]  # token: the step's labelled tokens; answer: the step's sampled answers
    train: LossFunction
    validate: LossFunction


def loss_settings(optim: TrainOptim, processor: DestaProcessor, model: DestaModel) -> LossSettings:
    """The LossSettings of a run: its optim section's KL temperature, sampling length and seed, the tokenizer's
    padding id and the ids that end the LLM's turn."""
    tokenizer = processor.tokenizer
    return LossSettings(optim.kl_temperature, optim.on_policy_max_new_tokens, optim.seed, tokenizer.pad_token_id,
                        frozenset(end_of_turn_ids(tokenizer, model.llm.generation_config)))


def unwrap(model: torch.nn.Module) -> DestaModel:
    """The DestaModel inside a DDP wrapper (FSDP2 shards the model in place: no wrapper)."""
    return getattr(model, "module", model)


def response_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                reverse: bool = False) -> torch.Tensor:
    """KL(teacher || student) at each response position (positions,): the logits (positions, vocab) of the positions
    that predict each response token, in the same order on both sides (desta.model.parts.labelled_logits gives them
    so), scaled by temperature squared. `reverse`: KL(student || teacher), mode-seeking (on-policy distillation), so
    the student is pushed off what the teacher finds unlikely rather than spread over all it finds likely."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"the student's sequences hold {student.shape[0]} response positions but the teacher's "
                         f"{teacher.shape[0]}; both must carry the same responses (was a sequence truncated? raise "
                         "data.max_length)")
    log_student = torch.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    target, estimate = (log_student, log_teacher) if reverse else (log_teacher, log_student)
    kl = torch.nn.functional.kl_div(estimate, target, log_target=True, reduction="none").sum(-1)
    return kl * temperature**2


@contextmanager
def root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP, the root unit's parameters (those no wrapped layer owns: the LLM's embeddings and head, the
    connector) gathered for a call that does not go through the model's forward (the text LLM's forward, the
    student's sampling); the wrapped layers gather their own. Elsewhere: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def teacher_logits(model: torch.nn.Module, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text LLM's logits (positions, vocab) at its turns' labelled positions: the speech model's own LLM with
    any LoRA switched off, reading the description, no gradients."""
    llm = unwrap(model).llm
    with torch.no_grad(), root_gathered(model), llm.disable_adapter() if hasattr(llm, "disable_adapter") \
            else nullcontext():
        logits, _ = labelled_logits(llm, teacher["labels"], input_ids=teacher["input_ids"],
                                    attention_mask=teacher["attention_mask"], use_cache=False)
    return logits


def cross_entropy(model: DestaModel, batch: LossBatch, settings: LossSettings, count: Any) -> tuple[torch.Tensor, Any]:
    """The target responses' cross-entropy, summed over their tokens and divided by `count` (the model's own loss
    with num_items_in_batch; the LM head projects the response positions only)."""
    outputs = model(**batch.student, logits_at="labelled", num_items_in_batch=count)
    return outputs.loss, outputs


def distillation(model: DestaModel, batch: LossBatch, settings: LossSettings, count: Any) -> tuple[torch.Tensor, Any]:
    """KL(text LLM reading the description || speech model) at each target response position, summed and divided
    by `count` (the step's labelled tokens)."""
    outputs = model(**batch.student, logits_at="labelled")
    kl = response_kl(outputs.label_logits, teacher_logits(model, batch.teacher), settings.temperature)
    return kl.sum() / count, outputs


def sample_seed(seed: int, step: int, sample_id: str, prompt: list[int]) -> int:
    """The seed of one row's sample: a function of the run's seed, the optimizer step, the sample's id and its
    prompt, so the answer drawn does not depend on which rows share its micro-batch or process.

    >>> seed = sample_seed(0, 3, "clip-1", [5, 6])
    >>> seed == sample_seed(0, 3, "clip-1", [5, 6]), seed == sample_seed(0, 4, "clip-1", [5, 6])
    (True, False)
    """
    key = f"{seed}/{step}/{sample_id}/{','.join(map(str, prompt))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def on_policy(model: DestaModel, batch: LossBatch, settings: LossSettings, count: Any) -> tuple[torch.Tensor, Any]:
    """Reverse KL to the text LLM on the tokens the speech model samples from the batch's prompts: each answer's
    mean over its tokens (every answer weighs the same, whatever its length), summed and divided by `count` (the
    step's answers)."""
    prompt_rows = prompts(batch.student["input_ids"], batch.student["labels"], batch.student["attention_mask"])
    seeds = [sample_seed(settings.seed, batch.step, sample_id, prompt)
             for sample_id, prompt in zip(batch.sample_ids, prompt_rows, strict=True)]
    with root_gathered(model):
        responses = sample_responses(unwrap(model), batch.student, prompt_rows, seeds, settings.end_ids,
                                     settings.pad_id, settings.max_new_tokens)
    student, text_turns = on_policy_batches(batch.student, batch.teacher, prompt_rows, responses, settings.pad_id)
    outputs = model(**student, logits_at="labelled")
    kl = response_kl(outputs.label_logits, teacher_logits(model, text_turns), settings.temperature, reverse=True)
    labelled = student["labels"][:, 1:] != IGNORE_INDEX  # (batch, seq - 1): the positions kl holds, row-major
    rows = labelled.nonzero()[:, 0]  # the row of each position
    per_row = torch.zeros(labelled.shape[0], device=kl.device).index_add(0, rows, kl)
    return (per_row / labelled.sum(dim=1).clamp_min(1)).sum() / count, outputs


LOSSES = {loss.name: loss for loss in (
    Loss("ce", "cross-entropy (target response tokens)", teacher=False, per="token", train=cross_entropy,
         validate=cross_entropy),
    Loss("kl", "KL(text LLM || speech model), target response tokens", teacher=True, per="token", train=distillation,
         validate=distillation),
    Loss("on_policy", "reverse KL on the speech model's own answers (validation: kl on the targets)", teacher=True,
         per="answer", train=on_policy, validate=distillation),
)}


def step_count(per: Literal["token", "answer"], batches: list[dict[str, Any]]) -> torch.Tensor:
    """The units a loss is averaged over in these micro-batches: labelled tokens (positions predicting one: a label
    after the first position) or answers (rows)."""
    if per == "answer":
        return torch.tensor(sum(len(batch["sample_ids"]) for batch in batches))
    return sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)
