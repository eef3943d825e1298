"""Mixing old data into new: how many replay rows make a given share, and a seeded mix."""

from __future__ import annotations

import numpy as np


def replay_count(new_rows: int, ratio: float) -> int:
    """Replay rows to add so they make `ratio` of the result.

    >>> replay_count(970, 0.03)
    30
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"the replay ratio must be in [0, 1), got {ratio}")
    return round(new_rows * ratio / (1 - ratio))


def draw(rows: list, count: int, seed: int) -> list:
    """`count` rows drawn with replacement, a pure function of the seed."""
    if count and not rows:
        raise ValueError("replay asked for but the replay set is empty")
    return [rows[int(i)] for i in np.random.default_rng(seed).integers(0, len(rows), size=count)] if count else []


def mix(new_rows: list, replay_rows: list, ratio: float, seed: int) -> list:
    """The new rows plus replay rows (drawn with replacement) making `ratio` of the result, shuffled (seeded).

    >>> mixed = mix(["t"] * 97, ["r"], 0.03, seed=0)
    >>> len(mixed), mixed.count("r")
    (100, 3)
    """
    mixed = list(new_rows) + draw(replay_rows, replay_count(len(new_rows), ratio), seed)
    return [mixed[int(i)] for i in np.random.default_rng(seed + 1).permutation(len(mixed))]
