"""Settings of `desta posttrain`: the model, the new task, the strategies and how to train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from desta.core.args import raise_problems
from desta.core.optim import OptimSection

STRATEGIES = ("sft", "lora", "replay", "magpie", "self_output", "paraphrase", "token_filter")
VERIFIERS = ("last_number", "exact_match", "json_schema", "regex", "python_tests")


@dataclass
class TaskSection:
    """The new task to learn."""

    kind: Literal["arithmetic", "jsonl"] = "arithmetic"
    """arithmetic (built in: word problems with worked answers) or jsonl files"""
    train: str | None = None
    """jsonl with instruction and answer columns (kind jsonl)"""
    eval: str | None = None
    """held-out jsonl (kind jsonl)"""
    train_size: int = 400
    """arithmetic: questions to train on"""
    eval_size: int = 60
    """arithmetic: held-out questions"""
    verifier: dict = field(default_factory=lambda: {"kind": "last_number"})
    """how answers are checked, e.g. {kind: last_number} or {kind: python_tests, timeout: 2}"""
    seed: int = 0
    """the arithmetic questions depend only on it"""

    def __post_init__(self) -> None:
        problems = []
        if self.kind == "jsonl" and not (self.train and self.eval):
            problems.append(("train", "kind jsonl needs task.train and task.eval files"))
        if self.kind == "arithmetic" and (self.train_size < 1 or self.eval_size < 1):
            problems.append(("train_size", "train_size and eval_size must be at least 1"))
        if self.verifier.get("kind") not in VERIFIERS:
            problems.append(("verifier", f"kind must be one of {list(VERIFIERS)}, got {self.verifier.get('kind')!r}"))
        raise_problems(problems)


def _posttrain_optim() -> OptimSection:
    return OptimSection(lr=2e-5, warmup_steps=5, max_steps=60, batch_size=8)


@dataclass
class PostTrainConfig:
    """Post-train a chat LLM on a new task with strategies against forgetting; compare them."""

    model: str = ""
    """the chat LLM (Hub id or folder)"""
    output_dir: str = "runs/forgetting"
    """one folder per strategy, the comparison table and figure"""
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    """what to compare, e.g. [sft, lora, lora+replay]; "+" combines strategies"""
    style: Literal["sft", "pretrain"] = "sft"
    """sft: chat turns, loss on answers; pretrain: raw text, loss on every token"""
    task: TaskSection = field(default_factory=TaskSection)
    optim: OptimSection = field(default_factory=_posttrain_optim)
    lora_lr: float = 2e-4
    """learning rate of strategies that include lora (fewer parameters learn faster)"""
    max_length: int = 256
    """tokens per training sequence"""
    lora: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    """peft LoraConfig settings"""
    replay_data: str | None = None
    """old-task jsonl (instruction, answer); null: the base model's answers to general prompts"""
    replay_ratio: float = 0.03
    """share of training rows drawn from the replay set (1-5 % in the literature)"""
    magpie_count: int = 48
    """pseudo-replay instructions the model writes itself (before filtering)"""
    magpie_max_new_tokens: int = 64
    """length limit of a Magpie instruction"""
    self_output_k: int = 4
    """sampled answers per question"""
    self_output_temperature: float = 0.7
    """sampling temperature of self-output answers"""
    self_output_fallback: Literal["gold", "drop"] = "gold"
    """questions with no verified answer of the model's own: train on gold, or drop them"""
    token_filter_threshold: float = 0.4
    """target tokens whose base-model probability is below this get no loss"""
    answer_max_new_tokens: int = 160
    """length limit of the model's own answers (replay, Magpie, self-output, paraphrase)"""
    eval_max_new_tokens: int = 96
    """length limit of answers to the new task's held-out questions"""
    probe_max_new_tokens: int = 96
    """length limit of answers to the retention probes"""
    generation_batch_size: int = 16
    """prompts per generate call"""

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append(("model", "required: the chat LLM to post-train (Hub id or folder)"))
        unknown = sorted({part for name in self.strategies for part in name.split("+")} - set(STRATEGIES))
        if unknown or not self.strategies:
            problems.append(("strategies", f"unknown {unknown}; choose from {list(STRATEGIES)}, combined with +"))
        if not 0 <= self.replay_ratio < 1:
            problems.append(("replay_ratio", f"must be in [0, 1), got {self.replay_ratio}"))
        if not 0 < self.token_filter_threshold < 1:
            problems.append(("token_filter_threshold", f"must be in (0, 1), got {self.token_filter_threshold}"))
        if min(self.self_output_k, self.magpie_count, self.max_length, self.generation_batch_size) < 1:
            problems.append(("self_output_k", "self_output_k, magpie_count, max_length and generation_batch_size "
                                              "must be at least 1"))
        if not self.lora_lr > 0:
            problems.append(("lora_lr", f"must be positive, got {self.lora_lr}"))
        raise_problems(problems)
