"""The training loop's parts around transformers' Trainer: the loss (cross-entropy, distillation from the text
LLM, or on-policy distillation on the speech model's own samples; each from the logits of the response positions
alone), duration-grouped sampling, a NaN/inf guard that names the step and samples, and readable progress lines
with the time left.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from desta.core.sequences import IGNORE_INDEX, end_of_turn_ids
from desta.model.parts import labelled_logits
from desta.train.data import EpochSeededSampler
from desta.train.on_policy import on_policy_batches, sample_responses

if TYPE_CHECKING:
    from torch.utils.data import Sampler

# What Trainer.prediction_step returns: (loss, logits, labels), each None when not computed.
PredictionOutput = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student), averaged over the positions that predict each response token.

    student_logits (batch, seq, vocab) with labels (batch, seq); teacher_logits (batch, seq_t, vocab) with
    teacher_labels (batch, seq_t). The two sequences differ before the response (audio vs description)
    but hold the same response tokens, so the k-th response position of one is the k-th of the other.
    """
    return response_kl(student_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX],
                       teacher_logits[:, :-1][teacher_labels[:, 1:] != IGNORE_INDEX], temperature)


def response_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                reverse: bool = False) -> torch.Tensor:
    """KL(teacher || student) averaged over response positions: the logits (positions, vocab) of the positions
    that predict each response token, in the same order on both sides (desta.model.parts.labelled_logits
    gives them so). `reverse`: KL(student || teacher), mode-seeking (on-policy distillation), so the student is
    pushed off what the teacher finds unlikely rather than spread over all it finds likely."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"the student's sequences hold {student.shape[0]} response positions but the teacher's "
                         f"{teacher.shape[0]}; both must carry the same responses (was a sequence truncated? raise "
                         "data.max_length)")
    log_student = torch.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    target, estimate = (log_student, log_teacher) if reverse else (log_teacher, log_student)
    kl = torch.nn.functional.kl_div(estimate, target, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def teacher_logits(model: torch.nn.Module, teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """The text LLM's logits (positions, vocab) at its turns' labelled positions: the speech model's own LLM with
    any LoRA switched off, reading the description, no gradients."""
    llm = getattr(model, "module", model).llm
    with torch.no_grad(), llm.disable_adapter() if hasattr(llm, "disable_adapter") else nullcontext():
        logits, _ = labelled_logits(llm, teacher["labels"], input_ids=teacher["input_ids"],
                                    attention_mask=teacher["attention_mask"], use_cache=False)
    return logits


class DestaTrainer(Trainer):
    """Trainer with duration-grouped sampling, optional distillation from the text LLM, and a NaN/inf guard
    that names the step and samples."""

    def __init__(self, *args, lengths: list[float] | None = None, kl_temperature: float | None = None,
                 decay_all: bool = False, on_policy_tokens: int | None = None, **kwargs):
        """kl_temperature: distil from the text LLM (the teacher_* rows of the batch); with on_policy_tokens, on
        the student's own samples of up to that many tokens while training (the validation loss stays the KL on
        the targets' responses, which needs no sampling)."""
        super().__init__(*args, **kwargs)
        self.lengths, self.kl_temperature, self.decay_all = lengths, kl_temperature, decay_all
        self.on_policy_tokens = on_policy_tokens

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model; under FSDP, the trainable weights gathered from their shards (every process takes
        part) and written by the main process with the config and processor, as without FSDP."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        weights = model.trainable_state_dict()
        if self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir, state_dict=weights)
            self.processing_class.save_pretrained(output_dir or self.args.output_dir)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """The weights AdamW decays: all of them with optim.decay_all, else transformers' rule."""
        if self.decay_all:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    # No public hook takes the sampler: Trainer groups by length only for `datasets` tables with a length
    # column, and overriding the public get_train_dataloader would re-implement accelerate's preparation.
    def _get_train_sampler(self, train_dataset: torch.utils.data.Dataset | None = None) -> Sampler | None:
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                  self.lengths, self.args.seed)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Trainer.compute_loss without the batch's sample_ids; raises FloatingPointError on a NaN/inf loss."""
        sample_ids = inputs.pop("sample_ids", [])
        teacher = {key[len("teacher_"):]: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        summed_over_devices = num_items_in_batch is not None and not teacher
        if summed_over_devices:
            inputs["num_items_in_batch"] = num_items_in_batch
        if teacher and self.on_policy_tokens and model.training:
            loss, outputs = self._on_policy_loss(model, inputs, teacher)
            return self._checked(loss, outputs, sample_ids, return_outputs)
        outputs = model(**inputs, logits_at="labelled")  # the LM head projects the response positions only
        loss = outputs.loss
        if summed_over_devices and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients over processes,
            # so each process's share is scaled back up (as Trainer.compute_loss does): the mean over all tokens
            loss = loss * self.accelerator.num_processes
        if teacher and self.kl_temperature is not None:
            loss = response_kl(outputs.label_logits, teacher_logits(model, teacher), self.kl_temperature)
        return self._checked(loss, outputs, sample_ids, return_outputs)

    def _on_policy_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                        teacher: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Reverse KL to the text LLM on the tokens the speech model samples from the batch's prompts."""
        student_model = getattr(model, "module", model)
        tokenizer = self.processing_class.tokenizer
        end_ids = end_of_turn_ids(tokenizer, student_model.llm.generation_config)
        prompt_rows, responses = sample_responses(student_model, inputs, end_ids, tokenizer.pad_token_id,
                                                  self.on_policy_tokens)
        student, text_turns = on_policy_batches(inputs, teacher, prompt_rows, responses, tokenizer.pad_token_id)
        outputs = model(**student, logits_at="labelled")
        loss = response_kl(outputs.label_logits, teacher_logits(model, text_turns), self.kl_temperature, reverse=True)
        return loss, outputs

    def _checked(self, loss: torch.Tensor, outputs: Any, sample_ids: list[str],
                 return_outputs: bool) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"loss is {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                                     f"samples in the batch: {sample_ids}")
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> PredictionOutput:
        """Trainer.prediction_step on the batch without its sample_ids: (loss, logits, labels)."""
        inputs = {k: v for k, v in inputs.items() if k != "sample_ids"}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def progress_line(step: int, max_steps: int, logs: dict[str, float], seconds: float, steps_timed: int) -> str:
    """One console line for a training log event: the step, the logged losses and learning rate, and the time
    to the end at the pace of the `steps_timed` steps that took `seconds`; "" for an event with none of them.

    >>> progress_line(20, 80, {"loss": 2.13361, "learning_rate": 0.00027, "epoch": 0.5}, 50.0, 20)
    'step 20/80 (25%): loss 2.134, lr 2.7e-04, epoch 0.50; 50 s elapsed, ETA 2 min 30 s'
    """
    parts = [f"lr {value:.1e}" if name == "learning_rate" else f"{name} {value:.2f}" if name == "epoch"
             else f"{name} {value:.3f}" for name, value in logs.items()
             if name in ("loss", "eval_loss", "train_loss", "learning_rate", "epoch")]
    if not parts:
        return ""
    line = f"step {step}/{max_steps} ({step / max(max_steps, 1):.0%}): {', '.join(parts)}; {_duration(seconds)} elapsed"
    if steps_timed > 0 and step < max_steps:
        line += f", ETA {_duration(seconds / steps_timed * (max_steps - step))}"
    return line


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


class ProgressLines(ProgressCallback):
    """The step bar (with its ETA), and each log event as a readable line (progress_line) instead of a dict:
    the training loss every log.logging_steps, the validation loss every log.eval_steps."""

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        """Start the bar and the clock (a resumed run times only the steps it runs)."""
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description("train (steps)")
        self.started, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Write the log event's line above the bar."""
        if not (state.is_world_process_zero and logs and self.training_bar is not None):
            return
        line = progress_line(state.global_step, state.max_steps, logs, time.perf_counter() - self.started,
                             state.global_step - self.first_step)
        if line:
            self.training_bar.write(line)


