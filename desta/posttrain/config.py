"""Settings of `desta posttrain`: the model, the new task, the retention sets, the strategies, the
seeds and how to train. Reads nothing; each problem is collected and raised at once (desta.core.args)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from desta.core.args import raise_problems
from desta.core.optim import OptimSection
from desta.core.rules import RuleSettings

STRATEGIES = ("sft", "lora", "replay", "magpie", "bos_replay", "self_output", "paraphrase", "self_distill",
              "token_filter", "knowledge_filter", "rl", "response_tuning", "rule_adapter", "self_align", "replay_kl",
              "on_policy_distill", "knowledge_known", "knowledge_unknown")
# The settings that change only what one part of a strategy does: a run's fingerprint leaves out those of the
# parts it does not have, so adding Magpie settings does not make a finished `sft` run stale.
PART_SETTINGS = {
    "lora": ("lora", "lora_lr"),
    "replay": ("replay_data", "replay_ratio"),
    "magpie": ("magpie_count", "magpie_max_new_tokens", "replay_ratio"),
    "bos_replay": ("bos_replay_count", "bos_replay_max_new_tokens", "bos_replay_prefix", "replay_ratio"),
    "self_output": ("self_output_k", "self_output_temperature", "self_output_fallback"),
    "token_filter": ("token_filter_threshold",),
    "knowledge_filter": ("knowledge_shots", "knowledge_samples", "knowledge_temperature", "knowledge_drop"),
    "rl": ("grpo",),
    "rule_adapter": ("rules",),
    "self_align": ("self_align_k", "self_align_temperature", "self_align_min_margin", "self_align_lr", "dpo"),
    "replay_kl": ("replay_kl_source", "replay_kl_weight", "magpie_count", "magpie_max_new_tokens", "bos_replay_count",
                  "bos_replay_max_new_tokens", "bos_replay_prefix", "replay_ratio"),
    "on_policy_distill": ("distill", "distill_weight"),
    "knowledge_known": ("knowledge_shots", "knowledge_samples", "knowledge_temperature", "knowledge_match_size"),
    "knowledge_unknown": ("knowledge_shots", "knowledge_samples", "knowledge_temperature", "knowledge_match_size"),
}
# The settings that choose which runs there are and what they keep, not what one run measures.
PLAN_SETTINGS = ("output_dir", "strategies", "seeds", "seeded_strategies", "replay_sweep", "overwrite", "save_models",
                 "save_models_of", "head_to_head")
KNOWLEDGE = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
RL_COMBINES = ("rl", "lora", "knowledge_filter")  # what rl (no target texts to transform) can be combined with
# Strategies trained by a trainer of their own (trl's GRPO, DPO, distillation): one a run, and only with these.
OWN_TRAINERS = {"rl": RL_COMBINES, "self_align": ("self_align", "lora", "rule_adapter"),
                "on_policy_distill": ("on_policy_distill", "lora", "rule_adapter")}
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
class PostTrainConfig:
    """Post-train a chat LLM on a new task with strategies against forgetting; compare them."""

    model: str = ""
    """the chat LLM (Hub id or folder)"""
    chat_template: str | None = None
    """a Jinja chat template for a model whose tokenizer has none (a base model, e.g. for rule_adapter); null: the
    tokenizer's own"""
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
    style: Literal["sft", "pretrain"] = "sft"
    """sft: chat turns, loss on answers; pretrain: raw text, loss on every token"""
    task: TaskSection = field(default_factory=TaskSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
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
    bos_replay_count: int = 48
    """pseudo-replay texts the model writes from its beginning-of-sequence token alone (before filtering)"""
    bos_replay_max_new_tokens: int = 96
    """length limit of a beginning-of-sequence text"""
    bos_replay_prefix: str | None = None
    """the text the samples start from; null: the tokenizer's BOS token. A chat model whose BOS opens a chat turn
    (SmolLM2: <|im_start|>) writes documents after its pretraining separator (SmolLM2: <|endoftext|>)"""
    self_output_k: int = 4
    """sampled answers per question"""
    self_output_temperature: float = 0.7
    """sampling temperature of self-output answers"""
    self_output_fallback: Literal["gold", "drop"] = "gold"
    """questions with no verified answer of the model's own: train on gold, or drop them"""
    token_filter_threshold: float = 0.4
    """target tokens whose base-model probability is below this get no loss"""
    knowledge_shots: int = 3
    """solved examples (other training items) before the question in the few-shot probe of knowledge_filter"""
    knowledge_samples: int = 4
    """sampled answers per item that knowledge_filter tries before calling it Unknown"""
    knowledge_temperature: float = 0.7
    """sampling temperature of those answers"""
    knowledge_drop: list[str] = field(default_factory=lambda: ["Unknown"])
    """knowledge categories knowledge_filter leaves out of training (HighlyKnown, MaybeKnown, WeaklyKnown,
    Unknown); [] keeps every item and only reports the split"""
    knowledge_match_size: bool = True
    """knowledge_known (HighlyKnown and MaybeKnown items) and knowledge_unknown (Unknown items) train on as many
    items each, the larger set drawn down to the smaller: only which items differs. false: all of each"""
    rules: RuleSettings = field(default_factory=RuleSettings)
    """the rule_adapter's decoding rules (no training): end of turn once an answer is complete enough, a
    penalty on repeated words"""
    self_align_k: int = 4
    """self_align: sampled answers per new-task question (up to eval_max_new_tokens), each scored 1-5 by the model"""
    self_align_temperature: float = 0.8
    """self_align: sampling temperature of those answers"""
    self_align_min_margin: float = 0.25
    """self_align: a question gives a preference pair (its best and worst answer by the model's own score) only
    when the scores differ by at least this much"""
    self_align_lr: float | None = None
    """self_align: its learning rate (DPO moves a model with far smaller steps than sft: trl's default is 1e-6);
    null: optim.lr, or lora_lr with lora"""
    dpo: dict = field(default_factory=lambda: {"beta": 0.1})
    """self_align: trl DPOConfig settings (learning rate, steps and batch come from optim, or lora_lr with lora)"""
    replay_kl_source: Literal["magpie", "bos"] = "magpie"
    """replay_kl: the self-generated replay rows: Magpie (instructions and answers from the bare user header) or
    texts sampled from the beginning of sequence"""
    replay_kl_weight: float = 1.0
    """replay_kl: weight of KL(base || model) on the replay rows' target tokens, added to the loss"""
    distill: dict = field(default_factory=lambda: {"beta": 1.0, "temperature": 1.0, "max_completion_length": 96})
    """on_policy_distill: trl DistillationConfig settings (beta 0: forward KL, 1: reverse KL; the answers the model
    samples to the new task's questions are scored by the frozen base model)"""
    distill_weight: float = 1.0
    """on_policy_distill: weight of the divergence from the base model on the model's own samples, added to the
    loss on the gold answers"""
    grpo: dict = field(default_factory=lambda: {"num_generations": 4, "temperature": 1.0, "beta": 0.0,
                                                "max_completion_length": 96})
    """trl GRPOConfig settings of the rl strategy (learning rate, steps and batch come from optim, or from
    lora_lr with lora); its reward is 1 when the task's verifier accepts the sampled answer, else 0"""
    answer_max_new_tokens: int = 160
    """length limit of the model's own answers (replay, Magpie, self-output, paraphrase)"""
    eval_max_new_tokens: int = 96
    """length limit of answers to the new task's held-out questions, and of the base model's answers that
    knowledge_filter judges (an answer right only after this many tokens is not one the evaluation counts)"""
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
        if min(self.bos_replay_count, self.bos_replay_max_new_tokens, self.knowledge_samples) < 1 \
                or self.knowledge_shots < 0:
            problems.append(("bos_replay_count", "bos_replay_count, bos_replay_max_new_tokens and knowledge_samples "
                                                 "must be at least 1, knowledge_shots 0 or more"))
        if set(self.knowledge_drop) - set(KNOWLEDGE):
            problems.append(("knowledge_drop", f"unknown categories {sorted(set(self.knowledge_drop) - set(KNOWLEDGE))}"
                                               f"; choose from {list(KNOWLEDGE)}"))
        for part, combines in OWN_TRAINERS.items():
            mixed = [n for n in self.strategies if part in n.split("+") and set(n.split("+")) - set(combines)]
            if mixed and part != "rl":
                problems.append(("strategies", f"{mixed}: {part} trains with a trainer of its own, so it combines only "
                                               f"with {[c for c in combines if c != part]}"))
        if any("self_align" in n.split("+") for n in self.strategies):
            problems += trl_problems(self.dpo, "dpo", "DPOConfig")
            if self.self_align_k < 2 or not self.self_align_temperature > 0 or self.self_align_min_margin < 0:
                problems.append(("self_align_k", "self_align_k must be at least 2 (a pair needs two answers), "
                                                 "self_align_temperature positive and self_align_min_margin 0 or more, "
                                                 f"got {self.self_align_k}, {self.self_align_temperature} and "
                                                 f"{self.self_align_min_margin}"))
        if any("on_policy_distill" in n.split("+") for n in self.strategies):
            problems += trl_problems(self.distill, "distill", "DistillationConfig")
        if self.self_align_lr is not None and not self.self_align_lr > 0:
            problems.append(("self_align_lr", f"must be positive or null, got {self.self_align_lr}"))
        if self.replay_kl_weight < 0 or self.distill_weight < 0:
            problems.append(("replay_kl_weight", f"replay_kl_weight and distill_weight must be 0 or more, got "
                                                 f"{self.replay_kl_weight} and {self.distill_weight}"))
        if any("rl" in name.split("+") for name in self.strategies):
            problems += trl_problems(self.grpo, "grpo", "GRPOConfig")
            group = self.grpo.get("num_generations", 8)  # trl's default
            if isinstance(group, int) and (self.optim.batch_size * self.optim.grad_accum) % group:
                problems.append(("grpo", f"num_generations {group} must divide optim.batch_size x grad_accum "
                                         f"({self.optim.batch_size} x {self.optim.grad_accum}): each batch holds "
                                         "whole groups of answers to one question"))
        rl_mixed = [name for name in self.strategies if "rl" in name.split("+")
                    and set(name.split("+")) - set(RL_COMBINES)]
        if rl_mixed:
            problems.append(("strategies", f"{rl_mixed}: rl learns from its own samples of the task's questions, so "
                                           f"it combines only with {list(RL_COMBINES)}"))
        bad_pairs = [p for p in self.head_to_head if len(p) != 2 or set(p) - set(self.strategies)]
        if bad_pairs:
            problems.append(("head_to_head", f"{bad_pairs}: each pair is two names from strategies {self.strategies}"))
        unknown_kept = sorted(set(self.save_models_of) - set(self.strategies))
        if unknown_kept:
            problems.append(("save_models_of", f"{unknown_kept} are not in strategies {self.strategies}"))
        unknown_seeded = sorted(name for name in self.seeded_strategies or [] if set(name.split("+")) - set(STRATEGIES))
        if unknown_seeded:
            problems.append(("seeded_strategies", f"{unknown_seeded} are not strategies; known: {list(STRATEGIES)}"))
        if len(set(self.seeds)) != len(self.seeds):
            problems.append(("seeds", f"each seed once, got {self.seeds}"))
        bad_ratios = [r for r in self.replay_sweep if not 0 <= r < 1]
        if bad_ratios or (self.replay_sweep and "sft" not in self.strategies and 0 in self.replay_sweep):
            problems.append(("replay_sweep", f"ratios must be in [0, 1) (got {bad_ratios or self.replay_sweep}); its "
                                             "0 point is the sft run, so 0 needs sft in strategies"))
        raise_problems(problems)

    @property
    def run_seeds(self) -> list[int]:
        """The seeds runs are trained with: `seeds`, or optim.seed alone."""
        return list(self.seeds) or [self.optim.seed]


# Set by desta for every run: a grpo, dpo or distill dict may not change them.
TRL_OWN = ("output_dir", "learning_rate", "per_device_train_batch_size", "max_steps", "num_train_epochs", "seed",
            "reward_funcs", "gradient_checkpointing")


def trl_problems(settings: dict[str, Any], key: str, config_class: str) -> list[tuple[str, str]]:
    """Keys of the `key` dict (grpo, dpo, distill) that trl's `config_class` does not have (with the nearest one), or
    that desta sets."""
    import trl

    known = {f.name for f in dataclasses.fields(getattr(trl, config_class))}
    problems = []
    for name in settings:
        if name in TRL_OWN:
            problems.append((key, f"{name} is set by desta (optim.* or lora_lr); remove it from {key} and set optim.* "
                                  "instead"))
        elif name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            problems.append((key, f"{config_class} has no setting {name!r}" + (f"; did you mean {near[0]!r}?"
                                                                                if near else "")))
    return problems

