"""magpie: pseudo replay the model writes itself (Magpie, ICLR 2025). From its chat template rendered up to the user
header it samples instructions (temperature 1), cut at the end of the user turn, then answers them greedily;
the rows are deduplicated, filtered and mixed in at replay.ratio. `desta magpie` writes such rows to a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from desta.core.args import raise_problems
from desta.core.chunks import to_jsonl
from desta.core.generation import SamplingSettings, TransformersBackend
from desta.core.replay import mix
from desta.core.sequences import end_of_turn_ids
from desta.core.summary import Summary
from desta.posttrain.strategies.base import DataStep, Strategy, keep_distinct, nonempty, sample_after

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class MagpieSection:
    """Magpie pseudo replay: instructions the model writes from its bare user header."""

    count: int = 48
    """pseudo-replay instructions the model writes itself (before filtering)"""
    max_new_tokens: int = 64
    """length limit of a Magpie instruction"""

    def __post_init__(self) -> None:
        if min(self.count, self.max_new_tokens) < 1:
            raise_problems([("count", f"count and max_new_tokens must be at least 1, got {self.count} and "
                                      f"{self.max_new_tokens}")])


def magpie_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template rendered up to and including the user header, as Magpie samples from it."""
    sentinel = "\u2063MAGPIE\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    return text[: text.index(sentinel)]


@torch.no_grad()
def magpie(backend: TransformersBackend, count: int, max_new_tokens: int = 64, min_words: int = 3,
           seed: int = 0, answer_tokens: int = 160) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Pseudo replay: the model writes instructions from the bare user header (temperature 1.0), then
    answers them greedily. Returns the rows and how many were dropped for each reason."""
    tokenizer = backend.tokenizer
    samples = sample_after(backend, magpie_prefix(tokenizer), count, max_new_tokens, seed,
                           end_of_turn_ids(tokenizer, backend.llm.generation_config))
    instructions = [text for text, finished in samples if finished]  # unfinished: no end of the user turn
    kept, filtered = keep_distinct(instructions, min_words)
    dropped = {**filtered, "unfinished": len(samples) - len(instructions)}
    answers = backend.generate([[{"role": "user", "content": t}] for t in kept],
                               SamplingSettings(max_new_tokens=answer_tokens))
    rows = [{"instruction": t, "answer": a.text} for t, a in zip(kept, answers, strict=True) if a.text]
    dropped["empty"] += len(kept) - len(rows)
    return rows, dropped


def magpie_rows(step: DataStep) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The run's Magpie rows (magpie.*, answers up to answer_max_new_tokens) and what was dropped."""
    section = step.config.magpie
    return magpie(step.backend, section.count, section.max_new_tokens, seed=step.seed,
                  answer_tokens=step.config.answer_max_new_tokens)


def mix_magpie(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with Magpie rows mixed in at replay.ratio."""
    pseudo, step.notes["magpie_dropped"] = magpie_rows(step)
    rows = mix(rows, nonempty(pseudo, "magpie", step.notes["magpie_dropped"]), step.config.replay.ratio, step.seed)
    step.notes["magpie_rows"] = len(pseudo)
    return rows


STRATEGY = Strategy("magpie", "pseudo replay: instructions the model writes from its bare user header, answered",
                    section=MagpieSection, reads=("replay.ratio",), stage="self_replay", data=mix_magpie)


@dataclass
class MagpieConfig:
    """Pseudo replay data: the model writes instructions from its bare user header and answers them."""

    model: str
    """the chat LLM (Hub id or folder)"""
    out: str
    """JSONL to write (instruction, answer)"""
    count: int = 64
    """instructions to sample before filtering"""
    max_new_tokens: int = 64
    """length limit of an instruction"""
    answer_max_new_tokens: int = 160
    """length limit of an answer"""
    seed: int = 0
    """the sampled instructions depend only on it"""


def write_magpie(config: MagpieConfig) -> Summary:
    """Write Magpie rows to config.out; returns the counts."""
    rows, dropped = magpie(TransformersBackend(config.model), config.count, config.max_new_tokens, seed=config.seed,
                           answer_tokens=config.answer_max_new_tokens)
    Path(config.out).write_text(to_jsonl(rows))
    return Summary({"rows": len(rows), "dropped": dropped, "out": config.out},
                   f"wrote {len(rows)} rows to {config.out}; dropped {dropped}")
