"""The training loop's parts around transformers' Trainer: the loss (a desta.train.losses record: cross-entropy,
distillation from the text LLM, or on-policy distillation on the speech model's own samples; each from the logits
of the response positions alone, averaged over the whole accumulated step), duration-grouped sampling, a NaN/inf
guard that names the step and samples, and readable progress lines with the time left.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from desta.train.data import EpochSeededSampler
from desta.train.losses import LOSSES, Loss, LossBatch, LossSettings, step_count

if TYPE_CHECKING:
    from torch.utils.data import Sampler


class DestaTrainer(Trainer):
    """Trainer with desta's losses (averaged over the accumulated step), duration-grouped sampling and a NaN/inf
    guard that names the step and samples."""

    def __init__(self, *args, loss: Loss = LOSSES["ce"], loss_settings: LossSettings | None = None,
                 lengths: list[float] | None = None, decay_all: bool = False, **kwargs):
        """loss: what the trainer minimises (desta.train.losses.LOSSES by optim.loss); loss_settings: what it reads
        besides the batch (KL temperature, sampling length and seed, end-of-turn and padding ids)."""
        super().__init__(*args, **kwargs)
        self.loss, self.loss_settings = loss, loss_settings or LossSettings()
        self.lengths, self.decay_all = lengths, decay_all
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
            warnings.warn("fsdp_cpu_ram_efficient_loading has no effect on desta train: every process has loaded the "
                          "base models in full before the process group exists (the speech model is built from two "
                          "checkpoints and a new connector, not by one from_pretrained); set it to false "
                          "(recipes/accelerate/fsdp.yaml does)", stacklevel=2)

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

    # Trainer saves FSDP checkpoints for resuming through these private methods, every weight's shard included: the
    # frozen bases (about 16 GB at 8B in bf16) in every checkpoint. The trainable weights are in the checkpoint's
    # model.safetensors already (save_model), so only the optimizer state and the schedule are added.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer
        from transformers.trainer import SCHEDULER_NAME

        plugin = self.accelerator.state.fsdp_plugin
        save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from desta.core.artifacts import WEIGHTS

        # every process reads the (small) trainable weights in full and keeps its shard of each
        set_model_state_dict(model or self.model, load_file(Path(resume_from_checkpoint) / WEIGHTS),
                             options=StateDictOptions(full_state_dict=True, strict=False))

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

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int,
                          device: torch.device) -> tuple[list, torch.Tensor | int | None]:
        """The micro-batches of one optimizer step and the units the loss is averaged over in them: labelled tokens
        (Trainer's own count) or, for a loss averaged over answers, their rows; summed over every process when
        args.average_tokens_across_devices (the default), as Trainer sums the tokens."""
        batches, tokens = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.loss.per == "token" or not batches:
            return batches, tokens
        answers = step_count("answer", batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            answers = self.accelerator.gather(answers).sum()
        return batches, answers

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The loss record's training loss (its validation loss in evaluation) on a batch without its sample ids and
        teacher rows, divided by `num_items_in_batch`, the step's units over every micro-batch (and process); raises
        FloatingPointError on a NaN/inf loss.

        With the units counted over every process, each process's share is scaled back up by the number of
        processes, as Trainer.compute_loss does: DDP and FSDP average the gradients over processes, so the step's
        gradient is the mean over all its units.
        """
        sample_ids = inputs.pop("sample_ids", [])
        teacher = {key[len("teacher_"):]: inputs.pop(key) for key in list(inputs) if key.startswith("teacher_")}
        compute = self.loss.train if model.training else self.loss.validate
        per = self.loss.per if model.training else "token"
        count = num_items_in_batch
        if count is None:  # Trainer divides this micro-batch's mean by the accumulation steps itself
            count = step_count(per, [{**inputs, "sample_ids": sample_ids}])
        batch = LossBatch(inputs, teacher, sample_ids, self.state.global_step)
        loss, outputs = compute(model, batch, self.loss_settings, torch.as_tensor(count).to(self.args.device))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"loss is {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                                     f"samples in the batch: {sample_ids}")
        return (loss, outputs) if return_outputs else loss


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


