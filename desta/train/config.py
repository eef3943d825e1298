"""Settings of `desta train` (and `desta plan`, which reads the same file): what to build, what to train on,
how to optimise, what to record. One dataclass per section; YAML plus key=value overrides (desta.core.args).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from desta.core.args import raise_problems
from desta.core.optim import OptimSection, Precision, resolved_precision
from desta.model.modeling import Architecture
from desta.model.tiny import TINY


@dataclass
class ModelBases:
    """What to build from: the base checkpoints, a trained start, the frozen parts' precision."""

    encoder: str = TINY
    """Whisper checkpoint (Hub id or folder); "tiny": a tiny random Whisper for smoke runs"""
    llm: str = TINY
    """chat LLM checkpoint; "tiny": a tiny random Llama-style model for smoke runs"""
    init_from: str | None = None
    """start from a saved DeSTA checkpoint's trainable weights"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights of the frozen parts; auto: the dtype optim.precision computes in (bfloat16 under bf16, the default on a
    GPU: half the memory, and no bf16 copy of every weight made each step; float32 under fp32, e.g. on a CPU)"""


# The frozen parts' dtype that each training precision computes in (model.dtype: auto).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def frozen_dtype(dtype: str, precision: Precision, gpu: bool | None = None) -> str:
    """model.dtype with auto resolved by optim.precision (`gpu` as desta.core.optim.resolved_precision takes it).

    >>> frozen_dtype("auto", "bf16"), frozen_dtype("auto", "auto", gpu=False), frozen_dtype("float32", "bf16")
    ('bfloat16', 'float32', 'float32')
    """
    return PRECISION_DTYPES[resolved_precision(precision, gpu)] if dtype == "auto" else dtype


@dataclass
class ModelSection(Architecture, ModelBases):
    """What to build: the bases (ModelBases) and the architecture (desta.model.modeling.Architecture, DestaConfig's
    own settings, so a setting added there is a `desta train` setting too)."""

    def __post_init__(self) -> None:
        raise_problems(self.problems())  # DestaConfig's own checks, reported with the other settings'


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
    packing: bool = False
    """pack each batch's samples into rows of up to pack_length tokens, each sample isolated (its own positions,
    block-diagonal attention): the same losses with less padding"""
    pack_length: int | None = None
    """tokens per packed row; null: max_length (at least max_length, so every sample fits a row)"""
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
        if self.pack_length is not None and self.pack_length < self.max_length:
            problems.append(("pack_length", f"must be at least max_length ({self.max_length}) so every sample fits a "
                                            f"row, got {self.pack_length}; raise it or set it to null"))
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

    loss: Literal["ce", "kl", "on_policy"] = "ce"
    """ce: cross-entropy on the target response; kl: distillation, the KL divergence to the text LLM's
    next-token distributions when it reads the description (as Ultravox and DiVA train), on the same positions;
    on_policy: the speech model samples its own answer to each prompt and the loss is the reverse KL to the text
    LLM reading the description, on the sampled tokens (slower: a generation per step; validation loss as kl)"""
    kl_temperature: float = 1.0
    """softens both distributions for the kl and on_policy losses (the loss is scaled by its square)"""
    on_policy_max_new_tokens: int = 64
    """longest answer the speech model samples per prompt for the on_policy loss"""
    decay_all: bool = False
    """weight decay on every trainable weight, LayerNorms, biases and queries included (the DeSTA2/2.5 code);
    false: transformers' rule, no decay on biases and norms"""

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not self.kl_temperature > 0:
            problems.append(("kl_temperature", f"must be positive, got {self.kl_temperature}"))
        if self.on_policy_max_new_tokens < 1:
            problems.append(("on_policy_max_new_tokens", f"must be at least 1, got {self.on_policy_max_new_tokens}"))
        raise_problems(problems)


@dataclass
class TrainConfig:
    """Train the connector (and optional LoRA) on a targets dataset: CONFIG.yaml plus key=value overrides."""

    output_dir: str = "runs/desta"
    """run folder: checkpoints, logs, the final weights"""
    resume: bool = True
    """continue from the newest checkpoint in output_dir (refused when settings that change the result differ)"""
    resume_with_changes: bool = False
    """let a resume change how long the run trains and how often it evaluates and saves (the settings
    desta.train.checkpoints.RESUME_CHANGEABLE lists)"""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: TrainOptim = field(default_factory=TrainOptim)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        if self.optim.loss == "on_policy" and self.data.packing:
            raise_problems([("data.packing", "optim.loss on_policy samples each prompt's answer on a row of its own; "
                                             "set data.packing=false (or optim.loss=kl)")])


