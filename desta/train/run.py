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

import json
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from desta.core.args import to_dict
from desta.core.artifacts import CONFIG, LOG_HISTORY, LOSS_CURVE, RUN_CONFIG, SUMMARY
from desta.core.optim import Precision, training_arguments
from desta.core.replay import replay_count
from desta.core.summary import Summary
from desta.model.modeling import DestaModel
from desta.model.processing import DestaProcessor
from desta.model.tiny import TINY
from desta.prompts import DEFAULT_SYSTEM_PROMPT
from desta.train.checkpoints import CheckpointChecksums, check_checkpoint, check_resume_settings, usable_checkpoint
from desta.train.config import ModelSection, TrainConfig, frozen_dtype
from desta.train.data import (
    DestaCollator,
    DestaDataset,
    ExampleTable,
    apply_length_rule,
    load_targets,
    load_text_rows,
    speech_examples,
    targets_system_prompt,
    text_examples,
)
from desta.train.losses import LOSSES, loss_settings
from desta.train.trainer import DestaTrainer, ProgressLines

if TYPE_CHECKING:
    from datasets import Dataset

    from desta.train.features import FeatureCache

TOKEN_COUNTS = "token_counts"  # OUTPUT/token_counts/: each training table's sequence lengths, cached


# ----- setup -----

def write_tiny_bases(bases: Path) -> None:
    """The tiny bases, written into a private folder and moved into place by one rename: the processes of one
    run (torchrun's ranks) build the model at the same time, and none may read a base another is still writing.
    If another process's bases are already in place, they are kept and this one's are discarded."""
    from desta.model.tiny import save_tiny_bases

    bases.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{bases.name}-", dir=bases.parent))
    try:
        save_tiny_bases(partial)
        partial.rename(bases)
    except OSError:
        if not bases.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def build_model(section: ModelSection, output_dir: Path, seed: int = 0,
                system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                precision: Precision = "auto") -> tuple[DestaModel, DestaProcessor]:
    """A fresh model from the section (tiny bases are written under OUTPUT/bases the first time), its frozen parts
    in model.dtype (auto: the dtype `precision` computes in), and its processor asking with `system_prompt`."""
    from desta.model.loading import build, load

    encoder, llm = section.encoder, section.llm
    if TINY in (encoder, llm):
        whisper_dir, llm_dir = output_dir / "bases" / "tiny-whisper", output_dir / "bases" / "tiny-llm"
        if not (llm_dir / CONFIG).exists():
            write_tiny_bases(output_dir / "bases")
        encoder = str(whisper_dir) if encoder == TINY else encoder
        llm = str(llm_dir) if llm == TINY else llm
    torch.manual_seed(seed)  # the connector starts from the same weights on every (re)run
    model, processor = build(encoder, llm, dtype=getattr(torch, frozen_dtype(section.dtype, precision)),
                             system_prompt=system_prompt,
                             **section.architecture())
    # What trains (connector, LoRA) and so its gradients and AdamW state stay in float32 whatever the frozen parts'
    # dtype: a bf16 weight rounds away updates under ~0.4 % of it, and fp16's gradient scaler refuses fp16 gradients.
    # Autocast computes in bf16/fp16 all the same.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if section.init_from:
        trained, _ = load(section.init_from)
        # strict=False: the frozen bases are not in a checkpoint; what it has that this model lacks is an error
        unexpected = model.load_state_dict(trained.trainable_state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"model.init_from {section.init_from} holds {len(unexpected)} weights this model lacks "
                             f"(e.g. {unexpected[0]}); build the same architecture, e.g. model.lora as in its "
                             "config.json")
    return model, processor


def split_held_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, held-out) split by clip id, so no clip is on both sides; held-out is None when empty. At least
    one clip always stays for training."""
    clips = sorted(set(dataset["id"]))
    if fraction <= 0 or len(clips) < 2:
        return dataset, None
    count = min(len(clips) - 1, max(1, math.ceil(len(clips) * fraction)))
    held = set(np.random.default_rng(seed).permutation(clips)[:count].tolist())
    ids = dataset["id"]  # rows picked by index (an index mapping in memory): no pass over the audio, no files written
    return (dataset.select([i for i, clip in enumerate(ids) if clip not in held], keep_in_memory=True),
            dataset.select([i for i, clip in enumerate(ids) if clip in held], keep_in_memory=True))


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


def setup(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> Run:
    """Data first (cheap to check), then the model, the examples and the Trainer."""
    from desta.train.features import FeatureCache, cache_features

    out = Path(config.output_dir)
    resume_from = usable_checkpoint(out) if config.resume else None
    if resume_from:  # before anything is read or written: a resume with other settings is refused
        changes = check_resume_settings(out / RUN_CONFIG, config, config.resume_with_changes)
        print(f"desta train: resuming from {Path(resume_from).name}"
              + "".join(f"; {k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    data = config.data
    train_set, eval_set, text_rows = _tables(config)
    system_prompt = targets_system_prompt(train_set, data.system_prompt)

    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    model, processor = build_model(config.model, out, config.optim.seed, system_prompt, config.optim.precision)
    cache = None
    if data.feature_cache:
        for part in (train_set, eval_set):
            if part is not None:
                cache_features(model, processor, part, data.feature_cache, dtype=data.cache_dtype,
                               progress=config.log.progress)
        cache = FeatureCache(data.feature_cache, model)

    loss = LOSSES[config.optim.loss]
    train_examples = speech_examples(train_set, processor, teacher=loss.teacher)
    replay = replay_count(len(train_examples), data.text_ratio) if text_rows else 0
    train_examples += text_examples(text_rows, replay, config.optim.seed, system_prompt)
    counted = out / TOKEN_COUNTS  # each table's token counts, computed once (the main process) and read back
    train_examples, over_train = apply_length_rule(processor, train_examples, data.max_length, data.overlength,
                                                   counted)
    eval_examples, over_eval = apply_length_rule(processor, speech_examples(eval_set, processor, teacher=loss.teacher),
                                                 data.max_length, data.overlength, counted) if eval_set is not None \
        else ([], 0)
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
    trainer = _trainer(config, out, model, processor, train_examples, eval_examples, cache, callbacks,
                       resumed=resume_from is not None)
    if resume_from:
        check_checkpoint(resume_from, model)
    return Run(config, out, model, processor, trainer, counts, resume_from)


def _tables(config: TrainConfig) -> tuple[Dataset, Dataset | None, list[dict[str, str]]]:
    """The training and held-out targets tables (data.max_clips applied; held out by clip when data.eval is
    unset) and the text replay rows."""
    data = config.data
    train_set = load_targets(data.train, "train")
    if data.max_clips:
        ids = train_set["id"]
        keep = set(sorted(set(ids))[: data.max_clips])
        train_set = train_set.select([i for i, clip in enumerate(ids) if clip in keep], keep_in_memory=True)
    eval_set = load_targets(data.eval, "eval") if data.eval else None
    text_rows = load_text_rows(data.text_replay) if data.text_replay and data.text_ratio > 0 else []
    if eval_set is None:
        train_set, eval_set = split_held_out(train_set, data.eval_fraction, config.optim.seed)
    return train_set, eval_set, text_rows


def _trainer(config: TrainConfig, out: Path, model: DestaModel, processor: DestaProcessor,
             train_examples: ExampleTable, eval_examples: ExampleTable | list, cache: FeatureCache | None,
             callbacks: list[TrainerCallback] | None, resumed: bool = False) -> DestaTrainer:
    """The Trainer of a run: its arguments from optim and log, the datasets, the collator, the loss. The held-out
    loss before training is measured once: a resumed run has it in its checkpoint's history already."""
    data, log, loss = config.data, config.log, LOSSES[config.optim.loss]
    has_eval = bool(eval_examples)
    args = training_arguments(
        config.optim, str(out), logging_steps=log.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=log.eval_steps,
        eval_on_start=has_eval and not resumed,
        save_strategy=log.save_strategy, save_steps=log.save_steps, save_total_limit=log.save_total_limit,
        report_to=[] if log.report_to == "none" else [log.report_to], dataloader_num_workers=data.num_workers,
        dataloader_persistent_workers=data.num_workers > 0,  # workers live across epochs, not re-forked
        ddp_find_unused_parameters=False, disable_tqdm=not log.progress)
    trainer = DestaTrainer(
        model=model, args=args, train_dataset=DestaDataset(train_examples, cache),
        eval_dataset=DestaDataset(eval_examples, cache) if has_eval else None,
        data_collator=DestaCollator(processor, data.max_length,
                                    (data.pack_length or data.max_length) if data.packing else None),
        processing_class=processor,
        callbacks=[*(callbacks or []), CheckpointChecksums()],
        lengths=train_examples.durations() if data.group_by_duration else None,
        loss=loss, loss_settings=loss_settings(config.optim, processor, model), decay_all=config.optim.decay_all)
    if log.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressLines())
    else:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


# ----- fit -----

def fit(run: Run) -> dict[str, Any]:
    """Train (or resume) to the end; the Trainer's metrics and the wall time."""
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run.trainer.train(resume_from_checkpoint=run.resume_from)
    return {**result.metrics, "seconds": time.perf_counter() - started}


# ----- save -----

def plot_losses(log_history: list[dict], path: Path | None, axis: str = LOSSES["ce"].axis) -> dict[str, list]:
    """Save the train and validation loss curves to `path` (None: no plot), the y axis and the PNG's title naming
    the loss (`axis`, a desta.train.losses record's); returns their (step, loss) points."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    if path is None:
        return {"train": train, "eval": evals}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(axis)
    ax.set_title(f"desta train: {axis}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": f"desta train: {axis}"})
    plt.close(fig)
    return {"train": train, "eval": evals}


def save(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    """Final weights and processor, the log history, the loss curve and summary.json, written by the main process
    (every process takes part in gathering the weights; the summary comes back on each)."""
    out, trainer = run.out, run.trainer
    trainer.save_model(str(out))
    main = trainer.is_world_process_zero()
    history = trainer.state.log_history
    if main:
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle Trainer writes; nothing reads it back
        (out / LOG_HISTORY).write_text(json.dumps(history, indent=1))
    curve = plot_losses(history, out / LOSS_CURVE if main else None, LOSSES[run.config.optim.loss].axis)
    parameters = run.model.parameter_counts()
    cuda = torch.cuda.is_available()
    summary = {
        "steps": trainer.state.global_step, "loss": run.config.optim.loss, **run.counts,
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
    if main:
        (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> Summary:
    """Run (or resume) a training run; returns the summary written to OUTPUT/summary.json."""
    run = setup(config, callbacks)
    summary = save(run, fit(run))
    return Summary(summary, f"trained {summary['steps']} steps on {summary['train_rows']} rows "
                            f"({summary['samples_per_second']} samples/s); loss {summary['first_train_loss']} -> "
                            f"{summary['last_train_loss']}; eval losses "
                            f"{[round(v, 4) for _, v in summary['eval_losses']]}")


def cache_features_for(config: TrainConfig) -> Summary:
    """The frozen encoder's tapped-layer features of the config's train and eval data, in data.feature_cache."""
    from desta.train.features import cache_features

    if not config.data.feature_cache:
        raise ValueError("set data.feature_cache=FOLDER (in the config or as an override)")
    train_set = load_targets(config.data.train, "train")
    eval_set = load_targets(config.data.eval, "eval") if config.data.eval else None
    model, processor = build_model(config.model, Path(config.output_dir), config.optim.seed,
                                   precision=config.optim.precision)
    for part in (train_set, eval_set):
        if part is not None:
            cache_features(model, processor, part, config.data.feature_cache, dtype=config.data.cache_dtype,
                           progress=config.log.progress)
    return Summary({"cache": config.data.feature_cache}, f"features cached in {config.data.feature_cache}")
