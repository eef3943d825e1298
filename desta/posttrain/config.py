"""Settings of `desta posttrain`: the model, the new task, the retention sets, the strategies and one section of
settings per strategy that has some (named after it, from desta.posttrain.strategies), the knowledge split, the
seeds and how to train. Reads nothing; each problem is collected and raised at once (desta.core.args).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from desta.core.args import raise_problems
from desta.core.optim import OptimSection
from desta.posttrain.knowledge import KnowledgeSection
from desta.posttrain.strategies import STRATEGIES, parts, records

# Settings that moved into a section when each strategy got one: an old key in a YAML file or on a command line is
# refused with its new place (desta.core.args), and a run fingerprint written with them is read in today's layout
# (desta.posttrain.run.upgraded). `lora` held peft's settings; they are lora.peft.
MOVED = {
    "lora_lr": "lora.lr", "lora": "lora.peft", "replay_data": "replay.data", "replay_ratio": "replay.ratio",
    "magpie_count": "magpie.count", "magpie_max_new_tokens": "magpie.max_new_tokens",
    "bos_replay_count": "bos_replay.count", "bos_replay_max_new_tokens": "bos_replay.max_new_tokens",
    "bos_replay_prefix": "bos_replay.prefix", "self_output_k": "self_output.k",
    "self_output_temperature": "self_output.temperature", "self_output_fallback": "self_output.fallback",
    "token_filter_threshold": "token_filter.threshold", "knowledge_shots": "knowledge.shots",
    "knowledge_samples": "knowledge.samples", "knowledge_temperature": "knowledge.temperature",
    "knowledge_drop": "knowledge.drop", "knowledge_match_size": "knowledge.match_size", "grpo": "rl.grpo",
    "rules": "rule_adapter", "self_align_k": "self_align.k", "self_align_temperature": "self_align.temperature",
    "self_align_min_margin": "self_align.min_margin", "self_align_lr": "self_align.lr", "dpo": "self_align.dpo",
    "replay_kl_source": "replay_kl.source", "replay_kl_weight": "replay_kl.weight",
    "distill": "on_policy_distill.distill", "distill_weight": "on_policy_distill.weight",
}
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


@dataclass
class RetentionSection:
    """What the model could do before: generated sets whose every item is scored before and after training."""

    format_size: int = 200
    """general requests, each with an IFEval instruction its answer must follow"""
    own_answer_size: int = 200
    """general requests whose base-model answers a trained model should still find likely"""
    refusal_size: int = 48
    """harmful requests to refuse, and as many safe ones that only sound risky, to answer; 0: none (a model that
    refuses no harmful request has no refusal to forget, and they cost a fifth of the measuring)"""
    own_answer_max_new_tokens: int = 64
    """length limit of the base model's reference answers"""
    seed: int = 0
    """the drawn items depend only on it"""

    def __post_init__(self) -> None:
        if min(self.format_size, self.own_answer_size, self.own_answer_max_new_tokens) < 1 or self.refusal_size < 0:
            raise_problems([("format_size", "format_size, own_answer_size and own_answer_max_new_tokens must be at "
                                            "least 1, refusal_size 0 (no refusal items) or more")])


def _posttrain_optim() -> OptimSection:
    return OptimSection(lr=2e-5, warmup_steps=5, max_steps=60, batch_size=8)


@dataclass
class RunPlan:
    """The settings that choose which runs there are and what they keep, not what one run measures: PostTrainConfig
    holds them (it derives from this class) and a run's fingerprint leaves them out (`plan_settings`)."""

    output_dir: str = "runs/forgetting"
    """one folder per strategy, the comparison table and figure"""
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    """what to compare, e.g. [sft, lora, lora+replay]; "+" combines strategies"""
    seeds: list[int] = field(default_factory=list)
    """training seeds (data order, sampling, LoRA initialisation): each seeded strategy runs once per seed, with
    optim.seed set to it; empty: optim.seed alone"""
    seeded_strategies: list[str] | None = None
    """the strategies that run once per seed (mean and spread); the others run with the first seed; null: all.
    Names not in `strategies` are skipped, so a shorter `strategies` list works with the recipe's list"""
    replay_sweep: list[float] = field(default_factory=list)
    """replay ratios to run `replay` at (first seed), for the sweep plot, e.g. [0, 0.01, 0.03, 0.05, 0.1]; 0 is
    `sft` itself"""
    head_to_head: list[list[str]] = field(default_factory=list)
    """pairs of strategies compared item by item in the report, the second minus the first, e.g.
    [[sft, response_tuning], [magpie, replay_kl]]; a pair with rule_adapter also gets a side-by-side table"""
    overwrite: bool = False
    """redo a finished run whose settings differ from this config (default: refuse, naming what changed)"""
    save_models: bool = True
    """keep each run's trained model (or adapter) in its folder (SmolLM2-135M in fp32: about 0.5 GB a run)"""
    save_models_of: list[str] = field(default_factory=list)
    """strategies whose trained model is kept even when save_models is false (e.g. for `desta token-shift`)"""


def plan_settings() -> tuple[str, ...]:
    """The names of RunPlan's settings."""
    return tuple(f.name for f in fields(RunPlan))


def with_strategy_sections(cls: type) -> type:
    """Give the config class one section per strategy that has settings, named after it (e.g. `replay`, holding
    replay.ratio), before @dataclass reads its fields: a new strategy needs no line here."""
    for name, record in STRATEGIES.items():
        if record.section is not None:
            cls.__annotations__[name] = record.section
            setattr(cls, name, field(default_factory=record.section))
    return cls


@dataclass
@with_strategy_sections
class PostTrainConfig(RunPlan):
    """Post-train a chat LLM on a new task with strategies against forgetting; compare them."""

    MOVED = MOVED

    model: str = ""
    """the chat LLM (Hub id or folder)"""
    chat_template: str | None = None
    """a Jinja chat template for a model whose tokenizer has none (a base model, e.g. for rule_adapter); null: the
    tokenizer's own"""
    style: Literal["sft", "pretrain"] = "sft"
    """sft: chat turns, loss on answers; pretrain: raw text, loss on every token"""
    task: TaskSection = field(default_factory=TaskSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    optim: OptimSection = field(default_factory=_posttrain_optim)
    max_length: int = 256
    """tokens per training sequence"""
    knowledge: KnowledgeSection = field(default_factory=KnowledgeSection)
    answer_max_new_tokens: int = 160
    """length limit of the model's own answers (replay, Magpie, self-output, paraphrase)"""
    eval_max_new_tokens: int = 96
    """length limit of answers to the new task's held-out questions, and of the base model's answers that the
    knowledge split and self_align judge (an answer right only after this many tokens is not one the evaluation
    counts)"""
    probe_max_new_tokens: int = 96
    """length limit of answers to the retention probes"""
    generation_batch_size: int = 16
    """prompts per generate call"""

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append(("model", "required: the chat LLM to post-train (Hub id or folder)"))
        if min(self.max_length, self.generation_batch_size) < 1:
            problems.append(("max_length", f"max_length and generation_batch_size must be at least 1, got "
                                           f"{self.max_length} and {self.generation_batch_size}"))
        raise_problems(problems + strategy_problems(self) + plan_problems(self))

    @property
    def run_seeds(self) -> list[int]:
        """The seeds runs are trained with: `seeds`, or optim.seed alone."""
        return list(self.seeds) or [self.optim.seed]


def strategy_problems(config: PostTrainConfig) -> list[tuple[str, str]]:
    """Unknown strategy names, combinations a strategy refuses (`Strategy.combines`) or with two trainers, and the
    checks of each strategy the config runs (`Strategy.check`)."""
    unknown = sorted({part for name in config.strategies for part in parts(name)} - set(STRATEGIES))
    if unknown or not config.strategies:
        return [("strategies", f"unknown {unknown}; choose from {list(STRATEGIES)}, combined with +")]
    problems = []
    for record in STRATEGIES.values():
        mixed = [n for n in config.strategies if record.name in parts(n) and record.combines is not None
                 and set(parts(n)) - {record.name} - set(record.combines)]
        if mixed:
            problems.append(("strategies", f"{mixed}: {record.name} {record.combines_why}, so it combines only with "
                                           f"{list(record.combines)}"))
    doubled = [n for n in config.strategies if sum(r.trainer is not None for r in records(parts(n))) > 1]
    if doubled:
        problems.append(("strategies", f"{doubled}: each combines strategies with trainers of their own; a run has "
                                       "one trainer"))
    used = records(part for name in config.strategies for part in parts(name))
    return problems + [p for record in used if record.check for p in record.check(config)]


def plan_problems(config: PostTrainConfig) -> list[tuple[str, str]]:
    """Names in the plan settings (head_to_head, save_models_of, seeded_strategies) that are not runs or
    strategies, repeated seeds, and replay ratios out of range."""
    problems = []
    bad_pairs = [p for p in config.head_to_head if len(p) != 2 or set(p) - set(config.strategies)]
    if bad_pairs:
        problems.append(("head_to_head", f"{bad_pairs}: each pair is two names from strategies {config.strategies}"))
    unknown_kept = sorted(set(config.save_models_of) - set(config.strategies))
    if unknown_kept:
        problems.append(("save_models_of", f"{unknown_kept} are not in strategies {config.strategies}"))
    unknown_seeded = sorted(name for name in config.seeded_strategies or [] if set(parts(name)) - set(STRATEGIES))
    if unknown_seeded:
        problems.append(("seeded_strategies", f"{unknown_seeded} are not strategies; known: {list(STRATEGIES)}"))
    if len(set(config.seeds)) != len(config.seeds):
        problems.append(("seeds", f"each seed once, got {config.seeds}"))
    bad_ratios = [r for r in config.replay_sweep if not 0 <= r < 1]
    if bad_ratios or (config.replay_sweep and "sft" not in config.strategies and 0 in config.replay_sweep):
        problems.append(("replay_sweep", f"ratios must be in [0, 1) (got {bad_ratios or config.replay_sweep}); its "
                                         "0 point is the sft run, so 0 needs sft in strategies"))
    return problems

