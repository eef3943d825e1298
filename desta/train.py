"""Stage 3, train: fit the connector (and optional LoRA) so the speech LLM answers like the text LLM.

Reads a targets dataset (audio, transcript, prompt, response), optional text-only replay rows and
an optional frozen-encoder feature cache. Writes OUTPUT/ (final trainable weights as safetensors,
config, processor files), OUTPUT/checkpoint-* (weights, optimizer, scheduler, sampler and RNG
state for resuming), run_config.yaml, TensorBoard logs, loss_curve.png and summary.json.
Built on transformers' Trainer, so `accelerate launch` runs it on several GPUs (DDP, FSDP,
DeepSpeed) with nothing custom in between.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from desta.audio import load_audio_ref, num_windows
from desta.config import load_config, to_dict
from desta.modeling import WEIGHTS_NAME, DestaModel
from desta.processing import DestaProcessor
from desta.prompts import DEFAULT_SYSTEM_PROMPT

TINY = "tiny"  # model.encoder / model.llm value that builds the tiny random models (CPU smoke runs)


@dataclass
class ModelSection:
    encoder: str = TINY  # Whisper checkpoint (Hub id or folder); "tiny": a tiny random Whisper
    llm: str = TINY  # chat LLM checkpoint; "tiny": a tiny random Llama-style model
    tapped_layers: list[int] | None = None  # None: per Whisper size (small [2,5,8,11], large-v3 [7,15,23,31])
    num_queries: int = 64  # vectors per 30 s window
    qformer_layers: int = 2  # 2 in DeSTA2, 6 in DeSTA2.5
    qformer_dropout: float = 0.1
    transcript_max_tokens: int = 100  # transcript tokens after the audio vectors
    pad_to_30s: bool = False  # the papers' padding; slower, kept for comparison
    lora: dict | None = None  # LoRA on the LLM, e.g. {r: 8, lora_alpha: 16}; None: LLM frozen
    init_from: str | None = None  # start from a saved DeSTA checkpoint's trainable weights
    dtype: str = "float32"  # weights of the frozen parts: float32, bfloat16 (GPU), float16


@dataclass
class DataSection:
    train: str = ""  # targets dataset folder (OUT/dataset of desta targets)
    eval: str | None = None  # held-out targets dataset; None: eval_fraction of train, split by clip
    eval_fraction: float = 0.05  # share of clips held out when eval is None (0: no evaluation)
    text_replay: str | None = None  # dataset with instruction and response columns (no audio)
    text_ratio: float = 0.0  # share of training rows that are text-only replay, e.g. 0.03
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # the same as the targets stage used
    max_length: int = 1024  # tokens per sequence, audio positions included
    overlength: str = "drop"  # longer sequences: drop (counted) or truncate
    feature_cache: str | None = None  # folder of cached encoder features; built first if missing
    cache_dtype: str = "float16"  # float16 halves the disk; float32 matches on-the-fly exactly
    group_by_duration: bool = True  # batches of similar length: less padding
    num_workers: int = 0  # dataloader worker processes (audio decoding)


@dataclass
class OptimSection:
    lr: float = 1e-4  # the papers' learning rate
    warmup_steps: int = 2000  # the papers: 2000 (DeSTA2), 5000 (DeSTA2.5)
    max_steps: int = -1  # -1: run `epochs`
    epochs: float = 5.0
    batch_size: int = 12  # per device; DeSTA2.5 used 12 on each of 8 GPUs
    grad_accum: int = 1  # optimizer step every N batches
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16
    gradient_checkpointing: bool = False  # trade compute for memory in the LLM
    seed: int = 42


@dataclass
class LogSection:
    report_to: str = "tensorboard"  # tensorboard, wandb, none
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 500  # checkpoint every N steps (weights, optimizer, scheduler, RNG)
    save_total_limit: int = 3  # keep this many checkpoints
    progress: bool = True  # progress bar and printed logs (TensorBoard logging is unaffected)


@dataclass
class TrainConfig:
    """Everything `desta train` needs; YAML plus key=value overrides."""

    output_dir: str = "runs/desta"
    resume: bool = True  # continue from the newest checkpoint in output_dir
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    log: LogSection = field(default_factory=LogSection)


# ----- model -----

def build_model(section: ModelSection, output_dir: Path) -> tuple[DestaModel, DestaProcessor]:
    from desta.loading import build, load

    encoder, llm = section.encoder, section.llm
    if TINY in (encoder, llm):
        from desta.testing import save_tiny_bases

        whisper_dir, llm_dir = output_dir / "bases" / "tiny-whisper", output_dir / "bases" / "tiny-llm"
        if not (llm_dir / "config.json").exists():
            save_tiny_bases(output_dir / "bases")
        encoder = str(whisper_dir) if encoder == TINY else encoder
        llm = str(llm_dir) if llm == TINY else llm
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[section.dtype]
    model, processor = build(encoder, llm, dtype=dtype, tapped_layers=section.tapped_layers,
                             num_queries=section.num_queries, qformer_layers=section.qformer_layers,
                             qformer_dropout=section.qformer_dropout,
                             transcript_max_tokens=section.transcript_max_tokens, pad_to_30s=section.pad_to_30s,
                             lora=section.lora)
    model.connector.float()  # the trainable part stays in float32; autocast handles bf16
    if section.init_from:
        trained, _ = load(section.init_from)
        model.load_state_dict(trained.trainable_state_dict(), strict=False)
    return model, processor


# ----- data -----

def load_targets(path: str, what: str):
    from datasets import load_from_disk

    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"{what} dataset {path!r} not found; give the folder written by desta targets "
                                "(OUT/dataset)")
    dataset = load_from_disk(path)
    needed = ["id", "audio", "prompt", "response"]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing} (has {dataset.column_names}); train on the output "
                         "of desta targets")
    if len(dataset) == 0:
        raise ValueError(f"{path} holds no rows; nothing to train on")
    return dataset


def load_text_rows(path: str) -> list[dict[str, str]]:
    from datasets import load_from_disk

    if Path(path).is_file():
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        rows = list(load_from_disk(path))
    bad = [i for i, r in enumerate(rows) if not r.get("instruction") or not r.get("response")]
    if not rows or bad:
        raise ValueError(f"{path}: text replay rows need non-empty instruction and response columns "
                         f"({len(bad)} of {len(rows)} rows do not)")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows]


@dataclass
class Example:
    id: str
    conversation: list[dict[str, str]]
    audio: dict | None  # {"bytes" | "path"}; None for text-only rows
    transcript: str | None
    duration: float


class DestaDataset(torch.utils.data.Dataset):
    """Examples decoded lazily: audio is read from disk (or the feature cache) when a batch needs it."""

    def __init__(self, examples: list[Example], cache=None):
        self.examples, self.cache = examples, cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        item: dict[str, Any] = {"id": example.id, "conversation": example.conversation,
                                "transcript": example.transcript, "audio": None, "cached": None}
        if example.audio is None:
            return item
        if self.cache is not None:
            item["cached"] = self.cache[example.id]
        else:
            item["audio"] = load_audio_ref(example.audio, name=example.id)
        return item


def speech_examples(dataset, system_prompt: str | None) -> list[Example]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    durations = dataset["duration"] if "duration" in dataset.column_names else [10.0] * len(dataset)
    transcripts = dataset["transcript"] if "transcript" in dataset.column_names else [None] * len(dataset)
    return [Example(id=clip_id, audio=audio, transcript=transcript, duration=float(duration),
                    conversation=system + [{"role": "user", "content": f"<|AUDIO|>\n{prompt}"},
                                           {"role": "assistant", "content": response}])
            for clip_id, audio, transcript, duration, prompt, response in zip(
                dataset["id"], dataset["audio"], transcripts, durations, dataset["prompt"], dataset["response"],
                strict=True)]


def text_examples(rows: list[dict[str, str]], count: int, seed: int, system_prompt: str | None) -> list[Example]:
    """`count` replay rows drawn with replacement (seeded)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    picks = np.random.default_rng(seed).integers(0, len(rows), size=count)
    return [Example(id=f"text-{i}", audio=None, transcript=None, duration=0.0,
                    conversation=system + [{"role": "user", "content": rows[i]["instruction"]},
                                           {"role": "assistant", "content": rows[i]["response"]}])
            for i in picks.tolist()]


def replay_count(speech_rows: int, ratio: float) -> int:
    """Text rows to add so they make `ratio` of the training set.

    >>> replay_count(970, 0.03)
    30
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"text_ratio must be in [0, 1), got {ratio}")
    return round(speech_rows * ratio / (1 - ratio))


def token_count(processor: DestaProcessor, example: Example) -> int:
    """Sequence length the processor will produce (audio positions and transcript included)."""
    text = processor.render(example.conversation)
    count = len(processor.tokenizer(text, add_special_tokens=False).input_ids)
    if example.audio is not None:
        windows = num_windows(int(example.duration * 16000))
        count += windows * processor.num_queries - 1 + len(processor.transcript_ids(example.transcript))
    return count


def apply_length_rule(processor: DestaProcessor, examples: list[Example], max_length: int,
                      rule: str) -> tuple[list[Example], int]:
    """Drop sequences over the budget (rule "drop"), or keep them for the collator to cut ("truncate")."""
    if rule not in ("drop", "truncate"):
        raise ValueError(f"data.overlength must be drop or truncate, got {rule!r}")
    over = [token_count(processor, e) > max_length for e in examples]
    if rule == "drop":
        return [e for e, long in zip(examples, over, strict=True) if not long], sum(over)
    return examples, sum(over)


class DestaCollator:
    """Items -> one padded batch: ids, masks, labels (-100 outside responses), audio features or cached
    encoder states, and the sample ids (for error messages)."""

    def __init__(self, processor: DestaProcessor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from desta.features import pad_cached

        conversations = [item["conversation"] for item in items]
        transcripts = [[item["transcript"]] if item["audio"] is not None or item["cached"] is not None else []
                       for item in items]
        if any(item["cached"] is not None for item in items):
            counts = [[len(item["cached"])] if item["cached"] is not None else [] for item in items]
            batch = dict(self.processor(conversations, transcripts=transcripts, window_counts=counts))
            windows = [w for item in items if item["cached"] is not None for w in item["cached"]]
            batch["audio_hidden_states"], batch["audio_step_mask"] = pad_cached(windows)
        else:
            audios = [[item["audio"]] if item["audio"] is not None else [] for item in items]
            batch = dict(self.processor(conversations, audios=audios, transcripts=transcripts))
        if batch["input_ids"].shape[1] > self.max_length:  # only with overlength "truncate"
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key] = batch[key][:, : self.max_length]
            self._check_audio_kept(batch)
        batch["sample_ids"] = [item["id"] for item in items]
        return batch

    def _check_audio_kept(self, batch: dict[str, Any]) -> None:
        audio_id = self.processor.audio_token_id
        kept = int((batch["input_ids"] == audio_id).sum())
        expected = (batch["input_features"].shape[0] if "input_features" in batch
                    else batch.get("audio_step_mask", torch.zeros(0, 0)).shape[0]) * self.processor.num_queries
        if kept != expected:
            raise ValueError(f"max_length {self.max_length} cuts into the audio positions; raise data.max_length "
                             "or use data.overlength: drop")


class EpochSeededSampler(LengthGroupedSampler):
    """Duration-grouped batches whose order depends only on (seed, epoch), so a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, batch_size: int, lengths: list[float], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


# ----- trainer -----

class DestaTrainer(Trainer):
    """Trainer with duration-grouped sampling, a NaN/inf guard that names the step and samples, and
    checkpoints that hold only the trainable weights."""

    def __init__(self, *args, lengths: list[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = lengths

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                  self.lengths, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sample_ids = inputs.pop("sample_ids", [])
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs.loss
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"loss is {loss.detach().float().item()} at step {self.state.global_step + 1}; "
                                     f"samples in the batch: {sample_ids}")
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != "sample_ids"}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from safetensors.torch import load_file

        model = model or self.model
        model = getattr(model, "module", model)
        weights = load_file(os.path.join(resume_from_checkpoint, WEIGHTS_NAME))
        expected = set(model.trainable_state_dict())
        if set(weights) != expected:
            raise ValueError(f"{resume_from_checkpoint} does not hold this model's trainable weights "
                             f"({len(set(weights) ^ expected)} names differ); was the config changed?")
        model.load_state_dict(weights, strict=False)


class StopAfter(TrainerCallback):
    """Stop after a given step (used to show that resuming reproduces the uninterrupted run)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def _precision(choice: str) -> dict[str, bool]:
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return {"bf16": cuda and torch.cuda.is_bf16_supported()}
    if choice in ("bf16", "fp16") and not cuda:
        raise ValueError(f"optim.precision {choice} needs a CUDA GPU; use fp32 or auto on CPU")
    if choice not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"optim.precision must be auto, fp32, bf16 or fp16, got {choice!r}")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _last_checkpoint(output_dir: Path) -> str | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None


def plot_losses(log_history: list[dict], path: Path) -> dict[str, list]:
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


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns the summary written to OUTPUT/summary.json."""
    from desta.features import FeatureCache, cache_features

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    torch.manual_seed(config.optim.seed)
    model, processor = build_model(config.model, out)

    train_set = load_targets(config.data.train, "train")
    eval_set = load_targets(config.data.eval, "eval") if config.data.eval else None
    if eval_set is None and config.data.eval_fraction > 0:
        clips = sorted(set(train_set["id"]))
        held = set(np.random.default_rng(config.optim.seed).permutation(clips)[
            : max(1, math.ceil(len(clips) * config.data.eval_fraction))].tolist()) if len(clips) > 1 else set()
        eval_set = train_set.filter(lambda r: r["id"] in held) if held else None
        train_set = train_set.filter(lambda r: r["id"] not in held) if held else train_set
    cache = None
    if config.data.feature_cache:
        for part in (train_set, eval_set):
            if part is not None:
                cache_features(model, processor, part, config.data.feature_cache, dtype=config.data.cache_dtype)
        cache = FeatureCache(config.data.feature_cache, model)

    system = config.data.system_prompt
    train_examples = speech_examples(train_set, system)
    replay = 0
    if config.data.text_replay and config.data.text_ratio > 0:
        replay = replay_count(len(train_examples), config.data.text_ratio)
        train_examples += text_examples(load_text_rows(config.data.text_replay), replay, config.optim.seed, system)
    train_examples, over_train = apply_length_rule(processor, train_examples, config.data.max_length,
                                                   config.data.overlength)
    eval_examples, over_eval = [], 0
    if eval_set is not None:
        eval_examples, over_eval = apply_length_rule(processor, speech_examples(eval_set, system),
                                                     config.data.max_length, config.data.overlength)
    if not train_examples:
        raise ValueError(f"no training rows left after the length rule (max_length {config.data.max_length})")
    log = print if config.log.progress else (lambda *a, **k: None)
    log(f"train rows: {len(train_examples)} ({replay} text-only replay); eval rows: {len(eval_examples)}; "
          f"over max_length {config.data.max_length}: {over_train} train + {over_eval} eval "
          f"({'dropped' if config.data.overlength == 'drop' else 'truncated'})", flush=True)

    if config.optim.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    has_eval = bool(eval_examples)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.optim.batch_size,
        per_device_eval_batch_size=config.optim.batch_size, gradient_accumulation_steps=config.optim.grad_accum,
        learning_rate=config.optim.lr, weight_decay=config.optim.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=config.optim.warmup_steps, max_steps=config.optim.max_steps,
        num_train_epochs=config.optim.epochs, max_grad_norm=config.optim.max_grad_norm,
        logging_steps=config.log.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=config.log.eval_steps, eval_on_start=has_eval,
        save_strategy="steps", save_steps=config.log.save_steps, save_total_limit=config.log.save_total_limit,
        report_to=[] if config.log.report_to == "none" else [config.log.report_to], seed=config.optim.seed,
        remove_unused_columns=False, dataloader_num_workers=config.data.num_workers,
        ddp_find_unused_parameters=False, use_cpu=not torch.cuda.is_available(), disable_tqdm=not config.log.progress,
        **_precision(config.optim.precision),
    )
    trainer = DestaTrainer(
        model=model, args=args, train_dataset=DestaDataset(train_examples, cache),
        eval_dataset=DestaDataset(eval_examples, cache) if has_eval else None,
        data_collator=DestaCollator(processor, config.data.max_length), processing_class=processor,
        callbacks=callbacks, lengths=[e.duration for e in train_examples] if config.data.group_by_duration else None,
    )
    if not config.log.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = _last_checkpoint(out) if config.resume else None
    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle Trainer writes; nothing reads it back
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    curve = plot_losses(history, out / "loss_curve.png")
    counts = model.parameter_counts()
    summary = {
        "steps": trainer.state.global_step, "train_rows": len(train_examples), "replay_rows": replay,
        "eval_rows": len(eval_examples), "over_max_length": {"train": over_train, "eval": over_eval,
                                                             "rule": config.data.overlength},
        "samples_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 3),
        "seconds": round(seconds, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_memory_kind": "GPU allocated" if torch.cuda.is_available() else "process max RSS",
        "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
        "first_train_loss": curve["train"][0][1] if curve["train"] else None,
        "last_train_loss": curve["train"][-1][1] if curve["train"] else None,
        "eval_losses": curve["eval"], "resumed_from": resume,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(config_path: str | None, overrides: list[str]) -> dict[str, Any]:
    return train(load_config(TrainConfig, config_path, overrides))

