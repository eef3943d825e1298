"""What a post-training strategy is to desta: one `Strategy` record holding all a run needs of it (its settings
section, what it combines with, its data transform and the stage it runs at, its trainer or none), what the data
and training steps hand its functions (`DataStep`, `TrainStep`), and the helpers several strategies share.

The data step of a run (desta.posttrain.data) starts from the new task's rows and applies each of the run's data
transforms at its stage, in the order of STAGES (within a stage, in the registry's order); the rows are then
tokenised (preference pairs excepted: their trainer tokenises them) and the label transforms run. The training
step (desta.posttrain.training) lets the run's strategies adapt the model (LoRA), then trains it with the one
trainer among them, or with transformers' Trainer on the examples (`train_on_examples`) when none has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from desta.core.extras import install_hint, missing
from desta.core.quality import repeated_ngram
from desta.posttrain.examples import TextCollator
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from desta.core.generation import TransformersBackend

Stage = Literal["select", "pairs", "targets", "self_replay", "replay", "labels"]
"""When a data transform runs: select (which task rows train), pairs (the rows become preference pairs), targets
(each row's answer is rewritten), self_replay (rows the model writes itself are mixed in), replay (the replay set,
old-task rows, is mixed in), labels (after tokenising: which tokens carry loss)."""
STAGES: tuple[str, ...] = get_args(Stage)


@dataclass
class DataStep:
    """What a data transform reads besides the rows, and where it notes what it did."""

    backend: TransformersBackend
    """the base model, generating with the run's batch size and precision"""
    config: Any
    """the run's PostTrainConfig (desta.posttrain.config builds on this package, so it is not imported here)"""
    verifier: Verifier
    """the task's verifier"""
    replay_rows: list[dict]
    """the replay set (replay.data, or the base model's answers to general requests): what stage replay mixes in"""
    cache: Path | None = None
    """where data several runs share is kept (the knowledge split): OUT/base"""
    notes: dict[str, Any] = field(default_factory=dict)
    """what each transform did, under keys of its own (reported in the comparison)"""

    @property
    def seed(self) -> int:
        """The run's seed (optim.seed): sampling, mixing and drawing depend on it."""
        return self.config.optim.seed


@dataclass
class TrainStep:
    """What a trainer reads: the model to train and the run's data and settings."""

    model: Any
    """what trains: the LLM, or a peft model wrapping it (trained in place)"""
    base: Any
    """a frozen copy of the base model for strategies that need one (Strategy.needs_base), else None"""
    tokenizer: Any
    """the model's tokenizer"""
    rows: list[dict]
    """the rows the data step made (preference pairs for self_align)"""
    examples: list[dict]
    """the rows tokenised (desta.posttrain.examples.encode)"""
    config: Any
    """the run's PostTrainConfig"""
    verifier: Verifier
    """the task's verifier"""
    pad_id: int
    """the padding token id batches are padded with"""
    lr: float
    """the learning rate: optim.lr, or lora.lr with lora"""
    scratch: Path
    """the trainer's scratch folder (removed after training)"""


@dataclass(frozen=True)
class Strategy:
    """A post-training strategy as desta runs it: its settings, what it combines with, its data and its trainer."""

    name: str
    summary: str  # what it does, in a line
    section: type | None = None  # its settings (a dataclass): the config's `<name>.*` keys
    reads: tuple[str, ...] = ()  # other settings its runs depend on: a strategy's section ("magpie") or a key
    combines: tuple[str, ...] | None = None  # the only strategies it combines with; None: any that allows it
    combines_why: str = ""  # why it combines with no others, for the error
    stage: Stage | None = None  # when its data transform runs
    data: Callable[[DataStep, list[dict]], list[dict]] | None = None  # rows -> rows (examples at stage labels)
    adapt: Callable[[Any, Any], tuple[Any, float]] | None = None  # (model, config) -> what trains, its learning rate
    trainer: Callable[[TrainStep], tuple[Any, dict[str, Any]]] | None = None  # -> (the trained trainer, notes)
    needs_base: bool = False  # its trainer reads a frozen copy of the base model (TrainStep.base)
    trains: bool = True  # False: no training at all (the model only decodes otherwise)
    decoding: Callable[[Any, set[int], Any], Any] | None = None  # (tokenizer, eos_ids, config) -> a logits processor
    check: Callable[[Any], list[tuple[str, str]]] | None = None  # problems of a config that runs it, beyond its section


# ----- helpers several strategies share -----

def keep_distinct(texts: list[str], min_words: int) -> tuple[list[str], dict[str, int]]:
    """Sampled texts without the empty, the short (under `min_words` words), the looping (a 3-word sequence
    4 times in a row) and repeats; and how many went for each reason.

    >>> keep_distinct(["Name a red fruit.", "", "Name a red fruit!", "Hi there", "Why is the sea salty?"], 3)
    (['Name a red fruit.', 'Why is the sea salty?'], {'empty': 1, 'too short': 1, 'repetition': 0, 'duplicate': 1})
    """
    kept, seen, dropped = [], set(), {"empty": 0, "too short": 0, "repetition": 0, "duplicate": 0}
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        if not text.strip():
            dropped["empty"] += 1
        elif len(words) < min_words:
            dropped["too short"] += 1
        elif repeated_ngram(words):
            dropped["repetition"] += 1
        elif " ".join(words) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(" ".join(words))
            kept.append(text)
    return kept, dropped


@torch.no_grad()
def sample_after(backend: TransformersBackend, prefix: str, count: int, max_new_tokens: int, seed: int,
                 stops: set[int]) -> list[tuple[str, bool]]:
    """`count` texts the model writes after `prefix` (temperature 1), each cut at its first `stops` token, and
    whether one came within `max_new_tokens`."""
    tokenizer, llm = backend.tokenizer, backend.llm
    ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    texts = []
    for start in range(0, count, backend.batch_size):
        batch = ids.repeat(min(backend.batch_size, count - start), 1).to(llm.device)
        out = llm.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                           top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=backend.pad_id)
        for row in out[:, ids.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), None)
            texts.append((tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is not None))
    return texts


def nonempty(rows: list[dict], section: str, dropped: dict[str, int]) -> list[dict]:
    """Self-written replay rows, or an error when filtering left none (a replay share of nothing cannot be mixed)."""
    if not rows and any(dropped.values()):
        raise ValueError(f"{section}: every sample was dropped ({dropped}); raise {section}.count or "
                         f"{section}.max_new_tokens")
    return rows


def first_last(values: list[float]) -> list[float] | None:
    """The first and last of a logged series, rounded; None when nothing was logged.

    >>> first_last([0.0, 0.123456, 0.5]), first_last([])
    ([0.0, 0.5], None)
    """
    return [round(values[0], 4), round(values[-1], 4)] if values else None


def train_on_examples(step: TrainStep, trainer_class: type | None = None, collator: Any = None,
                      **extra: Any) -> Any:
    """transformers' Trainer (or its subclass `trainer_class`, given `extra` keywords) trained on the step's tokenised
    examples with the run's optim settings and learning rate; returns it, its log history included."""
    from transformers import Trainer

    from desta.core.optim import training_arguments

    args = training_arguments(step.config.optim, str(step.scratch), learning_rate=step.lr, logging_steps=5,
                              save_strategy="no", report_to=[], disable_tqdm=True)
    trainer = (trainer_class or Trainer)(model=step.model, args=args, train_dataset=step.examples,
                                         data_collator=collator or TextCollator(step.pad_id), **extra)
    trainer.train()
    return trainer


# Set by desta for every run: a trl settings dict (rl.grpo, self_align.dpo, on_policy_distill.distill) may not
# change them.
TRL_OWN = ("output_dir", "learning_rate", "per_device_train_batch_size", "max_steps", "num_train_epochs", "seed",
           "reward_funcs", "gradient_checkpointing")


def trl_problems(settings: dict[str, Any], key: str, config_class: str) -> list[tuple[str, str]]:
    """Keys of the `key` dict (e.g. rl.grpo) that trl's `config_class` does not have (with the nearest one), or that
    desta sets; or that trl, the `posttrain` extra, is not installed."""
    if missing("posttrain"):
        return [("strategies", f"{key.split('.')[0]} trains with trl's {config_class}, and trl is not installed: "
                               f"{install_hint('posttrain')}")]
    import trl

    known = {f.name for f in dataclasses.fields(getattr(trl, config_class))}
    problems = []
    for name in settings:
        if name in TRL_OWN:
            problems.append((key, f"{name} is set by desta (optim.* or lora.lr); remove it from {key} and set optim.* "
                                  "instead"))
        elif name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            problems.append((key, f"{config_class} has no setting {name!r}" + (f"; did you mean {near[0]!r}?"
                                                                                if near else "")))
    return problems
