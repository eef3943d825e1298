"""Stage 3, train: fit the connector (and optional LoRA) so the speech LLM answers like the text LLM.

Reads a targets dataset (audio, transcript, prompt, response, system prompt), optional text-only
replay rows and an optional frozen-encoder feature cache. Writes OUTPUT/ (final trainable weights
as safetensors, config, processor files), OUTPUT/checkpoint-* (weights, optimizer, scheduler,
sampler and RNG state for resuming, and checksums.json: the SHA-256 of each file, checked before a
resume; a damaged checkpoint is skipped for the one before it), run_config.yaml, TensorBoard logs, loss_curve.png and
summary.json. `train()` reads as setup -> fit -> save. Built on transformers' Trainer, so
`accelerate launch` runs it on several GPUs (DDP, FSDP, DeepSpeed) with nothing custom in between.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from desta.core.args import raise_problems, to_dict
from desta.core.artifacts import LOG_HISTORY, LOSS_CURVE, RUN_CONFIG, SUMMARY, WEIGHTS
from desta.core.optim import OptimSection, training_arguments
from desta.core.replay import replay_count
from desta.core.sequences import IGNORE_INDEX
from desta.data import (
    DestaCollator,
    DestaDataset,
    EpochSeededSampler,
    apply_length_rule,
    load_targets,
    load_text_rows,
    speech_examples,
    targets_system_prompt,
    text_examples,
)
from desta.modeling import DestaModel
from desta.processing import DestaProcessor
from desta.tiny import TINY

if TYPE_CHECKING:
    from datasets import Dataset
    from torch.utils.data import Sampler

# What Trainer.prediction_step returns: (loss, logits, labels), each None when not computed.
PredictionOutput = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSection:
    """What to build."""

    encoder: str = TINY
    """Whisper checkpoint (Hub id or folder); "tiny": a tiny random Whisper for smoke runs"""
    llm: str = TINY
    """chat LLM checkpoint; "tiny": a tiny random Llama-style model for smoke runs"""
    tapped_layers: list[int] | None = None
    """encoder blocks feeding the connector; null: per Whisper size (small [2,5,8,11], large-v3 [7,15,23,31])"""
    num_queries: int = 64
    """connector vectors per 30 s window"""
    qformer_layers: int = 2
    """Q-Former depth: 2 in DeSTA2, 6 in DeSTA2.5"""
    qformer_dropout: float = 0.1
    """dropout inside the Q-Former"""
    qformer_intermediate_size: int | None = None
    """Q-Former feed-forward width; null: 4 x Whisper's d_model (the official DeSTA2/2.5 code: 3072, BERT's)"""
    query_layernorm: bool = True
    """BLIP-2's LayerNorm and dropout on the queries; false: they enter the encoder as they are (official code)"""
    query_init_std: float = 0.02
    """standard deviation of the initial queries (official code: 1.0)"""
    qformer_init: Literal["bert", "pytorch"] = "bert"
    """Q-Former Linear weights start as BERT's normal(0.02), or PyTorch's default (official code)"""
    transcript_max_tokens: int = 100
    """transcript tokens after the audio vectors in training (inference keeps the whole transcript)"""
    transcript_format: Literal["bare", "timestamped"] = "bare"
    """what the transcript slot reads: the bare transcript (the papers), or "[00:00-00:03] transcript" as the
    text LLM's description gives it (the model then hears the clip's length in words)"""
    pad_to_30s: bool = False
    """pad every window to 30 s as the papers do: slower, kept for comparison"""
    lora: dict | None = None
    """LoRA on the LLM, e.g. {r: 8, lora_alpha: 16}; null: the LLM stays frozen"""
    init_from: str | None = None
    """start from a saved DeSTA checkpoint's trainable weights"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights of the frozen parts (bfloat16 halves their memory on a GPU)"""

    def __post_init__(self) -> None:
        problems = []
        if self.num_queries < 1 or self.qformer_layers < 1 or self.transcript_max_tokens < 0:
            problems.append(("num_queries", "num_queries and qformer_layers must be at least 1, "
                                            "transcript_max_tokens 0 or more"))
        if self.qformer_intermediate_size is not None and self.qformer_intermediate_size < 1:
            problems.append(("qformer_intermediate_size", f"must be at least 1 (or null), got "
                                                          f"{self.qformer_intermediate_size}"))
        if not self.query_init_std > 0:
            problems.append(("query_init_std", f"must be positive, got {self.query_init_std}"))
        if not 0 <= self.qformer_dropout < 1:
            problems.append(("qformer_dropout", f"must be in [0, 1), got {self.qformer_dropout}"))
        raise_problems(problems)


@dataclass
class DataSection:
    """What to train on."""

    train: str = ""
    """targets dataset folder (OUT/dataset of desta targets)"""
    eval: str | None = None
    """held-out targets dataset; null: eval_fraction of train, split by clip"""
    eval_fraction: float = 0.05
    """share of clips held out when eval is null (0: no evaluation)"""
    max_clips: int | None = None
    """train on the first N clips (by id) of data.train only; null: all"""
    text_replay: str | None = None
    """JSONL or dataset with instruction and response columns (no audio)"""
    text_ratio: float = 0.0
    """share of training rows that are text-only replay, e.g. 0.03"""
    system_prompt: str | None = None
    """null: the system prompt the targets stage used (its system_prompt column); "": none"""
    max_length: int = 1024
    """tokens per sequence, audio positions included"""
    overlength: Literal["drop", "truncate"] = "drop"
    """longer sequences: drop (counted) or truncate"""
    feature_cache: str | None = None
    """folder of cached encoder features; built first if missing"""
    cache_dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    """float16 halves the disk; float32 matches on-the-fly exactly"""
    group_by_duration: bool = True
    """batches of similar length: less padding"""
    num_workers: int = 0
    """dataloader worker processes (audio decoding)"""

    def __post_init__(self) -> None:
        problems = []
        if not self.train:
            problems.append(("train", "required: the targets dataset folder (OUT/dataset of desta targets)"))
        if not 0 <= self.eval_fraction < 1:
            problems.append(("eval_fraction", f"is the share of clips held out, in [0, 1); got {self.eval_fraction}"))
        if not 0 <= self.text_ratio < 1:
            problems.append(("text_ratio", f"is a share of the training rows, in [0, 1); got {self.text_ratio}"))
        if self.text_ratio > 0 and not self.text_replay:
            problems.append(("text_ratio", "needs data.text_replay, the instruction/response rows to mix in"))
        if self.max_clips is not None and self.max_clips < 2:
            problems.append(("max_clips", f"must be at least 2 (or null: all), got {self.max_clips}"))
        if self.max_length < 1 or self.num_workers < 0:
            problems.append(("max_length", "max_length must be at least 1 and num_workers 0 or more"))
        raise_problems(problems)


@dataclass
class LogSection:
    """What to record and when."""

    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    """where training curves go"""
    logging_steps: int = 10
    """log the training loss every N steps"""
    eval_steps: int = 200
    """validation loss every N steps"""
    save_steps: int = 500
    """checkpoint every N steps (weights, optimizer, scheduler, RNG)"""
    save_strategy: Literal["steps", "epoch"] = "steps"
    """when to checkpoint: every save_steps, or at the end of every epoch"""
    save_total_limit: int = 3
    """keep this many checkpoints"""
    progress: bool = True
    """progress bar and printed logs (TensorBoard logging is unaffected)"""

    def __post_init__(self) -> None:
        if min(self.logging_steps, self.eval_steps, self.save_steps, self.save_total_limit) < 1:
            raise_problems([("logging_steps", "logging_steps, eval_steps, save_steps and save_total_limit must be "
                                              "at least 1")])


@dataclass
class TrainOptim(OptimSection):
    """How to optimise a speech model: the shared settings and what the loss compares."""

    loss: Literal["ce", "kl"] = "ce"
    """ce: cross-entropy on the target response; kl: distillation, the KL divergence to the text LLM's
    next-token distributions when it reads the description (as Ultravox and DiVA train), on the same positions"""
    kl_temperature: float = 1.0
    """softens both distributions for the kl loss (the loss is scaled by its square)"""
    decay_all: bool = False
    """weight decay on every trainable weight, LayerNorms, biases and queries included (the DeSTA2/2.5 code);
    false: transformers' rule, no decay on biases and norms"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.kl_temperature > 0:
            raise_problems([("kl_temperature", f"must be positive, got {self.kl_temperature}")])


@dataclass
class TrainConfig:
    """Train the connector (and optional LoRA) on a targets dataset: CONFIG.yaml plus key=value overrides."""

    output_dir: str = "runs/desta"
    """run folder: checkpoints, logs, the final weights"""
    resume: bool = True
    """continue from the newest checkpoint in output_dir"""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: TrainOptim = field(default_factory=TrainOptim)
    log: LogSection = field(default_factory=LogSection)


# ----- setup -----

def build_model(section: ModelSection, output_dir: Path, seed: int = 0) -> tuple[DestaModel, DestaProcessor]:
    """A fresh model from the section (tiny bases are written under OUTPUT/bases the first time)."""
    from desta.loading import build, load

    encoder, llm = section.encoder, section.llm
    if TINY in (encoder, llm):
        from desta.tiny import save_tiny_bases

        whisper_dir, llm_dir = output_dir / "bases" / "tiny-whisper", output_dir / "bases" / "tiny-llm"
        if not (llm_dir / "config.json").exists():
            save_tiny_bases(output_dir / "bases")
        encoder = str(whisper_dir) if encoder == TINY else encoder
        llm = str(llm_dir) if llm == TINY else llm
    torch.manual_seed(seed)  # the connector starts from the same weights on every (re)run
    model, processor = build(encoder, llm, dtype=DTYPES[section.dtype], tapped_layers=section.tapped_layers,
                             num_queries=section.num_queries, qformer_layers=section.qformer_layers,
                             qformer_dropout=section.qformer_dropout,
                             qformer_intermediate_size=section.qformer_intermediate_size,
                             query_layernorm=section.query_layernorm, query_init_std=section.query_init_std,
                             qformer_init=section.qformer_init,
                             transcript_max_tokens=section.transcript_max_tokens, pad_to_30s=section.pad_to_30s,
                             transcript_format=section.transcript_format,
                             lora=section.lora)
    model.connector.float()  # the trainable part stays in float32; autocast handles bf16
    if section.init_from:
        trained, _ = load(section.init_from)
        model.load_state_dict(trained.trainable_state_dict(), strict=False)
    return model, processor


def split_held_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) split by clip id, so no clip is on both sides; held-out is None when empty. At least
    one clip always stays for training."""
    clips = sorted(set(dataset["id"]))
    if fraction <= 0 or len(clips) < 2:
        return dataset, None
    count = min(len(clips) - 1, max(1, math.ceil(len(clips) * fraction)))
    held = set(np.random.default_rng(seed).permutation(clips)[:count].tolist())
    return dataset.filter(lambda r: r["id"] not in held), dataset.filter(lambda r: r["id"] in held)


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student), averaged over the positions that predict each response token.

    student_logits (batch, seq, vocab) with labels (batch, seq); teacher_logits (batch, seq_t, vocab) with
    teacher_labels (batch, seq_t). The two sequences differ before the response (audio vs description)
    but hold the same response tokens, so the k-th response position of one is the k-th of the other.
    """
    student = student_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]  # (positions, vocab)
    teacher = teacher_logits[:, :-1][teacher_labels[:, 1:] != IGNORE_INDEX]
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"the student's sequences hold {student.shape[0]} response positions but the teacher's "
                         f"{teacher.shape[0]}; both must carry the same responses (was a sequence truncated? raise "
                         "data.max_length)")
    log_student = torch.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


class DestaTrainer(Trainer):
    """Trainer with duration-grouped sampling, optional distillation from the text LLM, and a NaN/inf guard
    that names the step and samples."""

    def __init__(self, *args, lengths: list[float] | None = None, kl_temperature: float | None = None,
                 decay_all: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths, self.kl_temperature, self.decay_all = lengths, kl_temperature, decay_all

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
        outputs = model(**inputs)
        loss = outputs.loss
        if summed_over_devices and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients over processes,
            # so each process's share is scaled back up (as Trainer.compute_loss does): the mean over all tokens
            loss = loss * self.accelerator.num_processes
        if teacher and self.kl_temperature is not None:
            llm = getattr(model, "module", model).llm
            with torch.no_grad(), llm.disable_adapter() if hasattr(llm, "disable_adapter") else nullcontext():
                teacher_logits = llm(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"]).logits
            loss = distillation_loss(outputs.logits, inputs["labels"], teacher_logits, teacher["labels"],
                                     self.kl_temperature)
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


@dataclass
class Run:
    """A set-up training run: what fit and save need."""

    config: TrainConfig
    out: Path
    model: DestaModel
    processor: DestaProcessor
    trainer: DestaTrainer
    counts: dict[str, Any]  # rows: train, replay, eval, over max_length
    resume_from: str | None


CHECKSUMS = "checksums.json"  # in each checkpoint-*: file name -> SHA-256, written once the save is complete


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (but CHECKSUMS itself), by path relative to it."""
    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        sums[str(path.relative_to(folder))] = digest.hexdigest()
    return sums


class CheckpointChecksums(TrainerCallback):
    """Writes checkpoint-N/checksums.json after each save, when every process has written its files: a
    checkpoint without it did not finish saving, one whose files differ from it was damaged since."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Hash the checkpoint the Trainer has just written (the main process; the others wait for it)."""
        from accelerate import PartialState
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        PartialState().wait_for_everyone()  # each process writes its own RNG state file
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                tmp = folder / (CHECKSUMS + ".tmp")
                tmp.write_text(json.dumps(file_checksums(folder), indent=1))
                tmp.replace(folder / CHECKSUMS)
        PartialState().wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (naming the file), or None when its files match checksums.json."""
    listed = folder / CHECKSUMS
    if not listed.is_file():
        return f"{listed} is missing: the save did not finish (or predates checksums)"
    try:
        expected = json.loads(listed.read_text())
    except json.JSONDecodeError:
        return f"{listed} is damaged"
    found = file_checksums(folder)
    for name, digest in expected.items():
        if name not in found:
            return f"{folder / name} is missing"
        if found[name] != digest:
            return f"{folder / name} does not match its checksum (truncated or overwritten)"
    return None


def usable_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-* whose files match their checksums; a damaged newer one is named on stderr and
    skipped. Raises ValueError, naming each damaged file and the fix, when checkpoints exist but none is
    usable; None when there is none."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    problems = []
    for folder in checkpoints:
        problem = checkpoint_problem(folder)
        if problem is None:
            if problems:
                print(f"desta train: resuming from {folder.name} instead of the damaged newer checkpoint(s): "
                      + "; ".join(problems), file=sys.stderr, flush=True)
            return str(folder)
        problems.append(problem)
    if problems:
        raise ValueError(f"no checkpoint in {output_dir} can be resumed from: {'; '.join(problems)}. Set resume=false "
                         "to start over (or restore the files)")
    return None


def check_checkpoint(folder: str, model: DestaModel) -> None:
    """Refuse to resume from a checkpoint that does not hold this model's trainable weights."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as handle:
        names = set(handle.keys())
    expected = set(model.trainable_state_dict())
    if names != expected:
        raise ValueError(f"{folder} does not hold this model's trainable weights ({len(names ^ expected)} names "
                         "differ); was the model config changed? Use a new output_dir or resume=false")


def setup(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> Run:
    """Data first (cheap to check), then the model, the examples and the Trainer."""
    from desta.features import FeatureCache, cache_features

    data = config.data
    train_set = load_targets(data.train, "train")
    if data.max_clips:
        keep = set(sorted(set(train_set["id"]))[: data.max_clips])
        train_set = train_set.filter(lambda row: row["id"] in keep)
    eval_set = load_targets(data.eval, "eval") if data.eval else None
    text_rows = load_text_rows(data.text_replay) if data.text_replay and data.text_ratio > 0 else []
    if eval_set is None:
        train_set, eval_set = split_held_out(train_set, data.eval_fraction, config.optim.seed)
    system_prompt = targets_system_prompt(train_set, data.system_prompt)

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    model, processor = build_model(config.model, out, config.optim.seed)
    processor.system_prompt = system_prompt
    cache = None
    if data.feature_cache:
        for part in (train_set, eval_set):
            if part is not None:
                cache_features(model, processor, part, data.feature_cache, dtype=data.cache_dtype,
                               progress=config.log.progress)
        cache = FeatureCache(data.feature_cache, model)

    distill = config.optim.loss == "kl"
    train_examples = speech_examples(train_set, processor, teacher=distill)
    replay = replay_count(len(train_examples), data.text_ratio) if text_rows else 0
    train_examples += text_examples(text_rows, replay, config.optim.seed, system_prompt)
    train_examples, over_train = apply_length_rule(processor, train_examples, data.max_length, data.overlength)
    eval_examples, over_eval = apply_length_rule(processor, speech_examples(eval_set, processor, teacher=distill),
                                                 data.max_length, data.overlength) if eval_set is not None else ([], 0)
    if not train_examples:
        raise ValueError(f"no training rows left after the length rule (data.max_length {data.max_length}); raise "
                         "data.max_length or use data.overlength=truncate")
    counts = {"train_rows": len(train_examples), "replay_rows": replay, "eval_rows": len(eval_examples),
              "over_max_length": {"train": over_train, "eval": over_eval, "rule": data.overlength}}
    if config.log.progress:
        print(f"train rows: {len(train_examples)} ({replay} text-only replay); eval rows: {len(eval_examples)}; "
              f"over max_length {data.max_length}: {over_train} train + {over_eval} eval "
              f"({'dropped' if data.overlength == 'drop' else 'truncated'})", flush=True)

    if config.optim.gradient_checkpointing:
        model.llm.activation_checkpointing_enable()  # non-reentrant; DestaModel.train keeps it working while frozen
    has_eval = bool(eval_examples)
    log = config.log
    args = training_arguments(
        config.optim, str(out), logging_steps=log.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=log.eval_steps, eval_on_start=has_eval,
        save_strategy=log.save_strategy, save_steps=log.save_steps, save_total_limit=log.save_total_limit,
        report_to=[] if log.report_to == "none" else [log.report_to], dataloader_num_workers=data.num_workers,
        ddp_find_unused_parameters=False, disable_tqdm=not log.progress)
    trainer = DestaTrainer(
        model=model, args=args, train_dataset=DestaDataset(train_examples, cache),
        eval_dataset=DestaDataset(eval_examples, cache) if has_eval else None,
        data_collator=DestaCollator(processor, data.max_length), processing_class=processor,
        callbacks=[*(callbacks or []), CheckpointChecksums()],
        lengths=[e.duration for e in train_examples] if data.group_by_duration else None,
        kl_temperature=config.optim.kl_temperature if distill else None, decay_all=config.optim.decay_all)
    if log.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressLines())
    else:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume_from = usable_checkpoint(out) if config.resume else None
    if resume_from:
        check_checkpoint(resume_from, model)
    return Run(config, out, model, processor, trainer, counts, resume_from)


# ----- fit -----

def fit(run: Run) -> dict[str, Any]:
    """Train (or resume) to the end; the Trainer's metrics and the wall time."""
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run.trainer.train(resume_from_checkpoint=run.resume_from)
    return {**result.metrics, "seconds": time.perf_counter() - started}


# ----- save -----

def plot_losses(log_history: list[dict], path: Path) -> dict[str, list]:
    """Save the train and validation loss curves to `path`; returns their (step, loss) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_title("desta train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"train": train, "eval": evals}


def save(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    """Final weights and processor, the log history, the loss curve and summary.json."""
    out, trainer = run.out, run.trainer
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle Trainer writes; nothing reads it back
    history = trainer.state.log_history
    (out / LOG_HISTORY).write_text(json.dumps(history, indent=1))
    curve = plot_losses(history, out / LOSS_CURVE)
    parameters = run.model.parameter_counts()
    cuda = torch.cuda.is_available()
    summary = {
        "steps": trainer.state.global_step, **run.counts,
        "samples_per_second": round(metrics.get("train_samples_per_second", 0.0), 3),
        "seconds": round(metrics["seconds"], 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30 if cuda
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_memory_kind": "GPU allocated" if cuda else "process max RSS",
        "trainable_parameters": parameters["trainable"], "total_parameters": parameters["total"],
        "first_train_loss": curve["train"][0][1] if curve["train"] else None,
        "last_train_loss": curve["train"][-1][1] if curve["train"] else None,
        "eval_losses": curve["eval"], "resumed_from": run.resume_from,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary written to OUTPUT/summary.json."""
    run = setup(config, callbacks)
    metrics = fit(run)
    return save(run, metrics)


def cache_features_for(config: TrainConfig) -> Path:
    """The frozen encoder's tapped-layer features of the config's train and eval data, in data.feature_cache."""
    from desta.features import cache_features

    if not config.data.feature_cache:
        raise ValueError("set data.feature_cache=FOLDER (in the config or as an override)")
    train_set = load_targets(config.data.train, "train")
    eval_set = load_targets(config.data.eval, "eval") if config.data.eval else None
    model, processor = build_model(config.model, Path(config.output_dir), config.optim.seed)
    for part in (train_set, eval_set):
        if part is not None:
            cache_features(model, processor, part, config.data.feature_cache, dtype=config.data.cache_dtype,
                           progress=config.log.progress)
    return Path(config.data.feature_cache)
