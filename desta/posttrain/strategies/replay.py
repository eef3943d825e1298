"""replay: a share (replay.ratio, 1-5 % in the literature) of the training rows is drawn from the replay set:
old-task rows (replay.data), or the base model's own answers to general requests (Continual-T0; Safety-Tuned
LLaMAs). magpie, bos_replay and replay_kl mix their self-written rows in at the same ratio."""

from __future__ import annotations

from dataclasses import dataclass

from desta.core.args import raise_problems
from desta.core.replay import mix
from desta.posttrain.strategies.base import DataStep, Strategy


@dataclass
class ReplaySection:
    """Old-task rows mixed into training."""

    data: str | None = None
    """old-task jsonl (instruction, answer); null: the base model's answers to general prompts"""
    ratio: float = 0.03
    """share of training rows drawn from the replay set (1-5 % in the literature); magpie, bos_replay and replay_kl
    mix their own rows in at this share too"""

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise_problems([("ratio", f"must be in [0, 1), got {self.ratio}")])


def mix_replay(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with the replay set's rows mixed in at replay.ratio (seeded; desta.core.replay.mix)."""
    return mix(rows, step.replay_rows, step.config.replay.ratio, step.seed)


STRATEGY = Strategy("replay", "mixes a share of old-task rows into training", section=ReplaySection, stage="replay",
                    data=mix_replay)
