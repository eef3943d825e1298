"""bos_replay: LAMOL-style pseudo replay (ICLR 2020). The model writes texts from its beginning-of-sequence token
(or bos_replay.prefix) alone, sampled at temperature 1; filtered like Magpie's and mixed in at replay.ratio as plain
language-modelling rows (loss on every token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from desta.core.args import raise_problems
from desta.core.replay import mix
from desta.core.sequences import end_of_turn_ids
from desta.posttrain.strategies.base import DataStep, Strategy, keep_distinct, nonempty, sample_after

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from desta.core.generation import TransformersBackend


@dataclass
class BosReplaySection:
    """Pseudo replay from the beginning of sequence: texts the model writes from its BOS token alone."""

    count: int = 48
    """pseudo-replay texts the model writes from its beginning-of-sequence token alone (before filtering)"""
    max_new_tokens: int = 96
    """length limit of a beginning-of-sequence text"""
    prefix: str | None = None
    """the text the samples start from; null: the tokenizer's BOS token. A chat model whose BOS opens a chat turn
    (SmolLM2: <|im_start|>) writes documents after its pretraining separator (SmolLM2: <|endoftext|>)"""

    def __post_init__(self) -> None:
        if min(self.count, self.max_new_tokens) < 1:
            raise_problems([("count", f"count and max_new_tokens must be at least 1, got {self.count} and "
                                      f"{self.max_new_tokens}")])


def bos_prefix(tokenizer: PreTrainedTokenizerBase, prefix: str | None = None) -> str:
    """The text BOS replay samples from: `prefix`, else the tokenizer's BOS token."""
    text = prefix if prefix is not None else tokenizer.bos_token
    if not text:
        raise ValueError("the tokenizer has no BOS token; set bos_replay.prefix to the text samples start from, e.g. "
                         "its document separator (<|endoftext|>)")
    return text


def lm_rows(texts: list[str], prefix: str, min_words: int = 5) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Sampled texts -> language-modelling rows, each its prefix and text (see desta.posttrain.examples.encode: loss
    on every token), without empty, short, looping or repeated texts; and how many were dropped for each reason.

    >>> rows, dropped = lm_rows(["The river rose slowly in the night.", "ok", "The river rose slowly in the night."],
    ...                         "<s>")
    >>> rows, dropped["too short"], dropped["duplicate"]
    ([{'text': '<s>The river rose slowly in the night.'}], 1, 1)
    """
    kept, dropped = keep_distinct(texts, min_words)
    return [{"text": prefix + text} for text in kept], dropped


@torch.no_grad()
def bos_replay(backend: TransformersBackend, count: int, max_new_tokens: int = 96, prefix: str | None = None,
               seed: int = 0, min_words: int = 5) -> tuple[list[dict[str, str]], dict[str, int]]:
    """LAMOL-style pseudo replay: the model writes `count` texts from its BOS token (or `prefix`) alone, sampled
    at temperature 1, each up to an end-of-sequence token or `max_new_tokens`; see `lm_rows`."""
    tokenizer = backend.tokenizer
    start = bos_prefix(tokenizer, prefix)
    special = set(tokenizer(start, add_special_tokens=False).input_ids) & set(tokenizer.all_special_ids)
    stops = end_of_turn_ids(tokenizer, backend.llm.generation_config) | special  # e.g. the next document separator
    texts = [text for text, _ in sample_after(backend, start, count, max_new_tokens, seed, stops)]
    return lm_rows(texts, start, min_words)


def bos_replay_rows(step: DataStep) -> tuple[list[dict[str, str]], dict[str, int]]:
    """The run's beginning-of-sequence texts (bos_replay.*) and what was dropped."""
    section = step.config.bos_replay
    return bos_replay(step.backend, section.count, section.max_new_tokens, section.prefix, step.seed)


def mix_bos_replay(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with beginning-of-sequence texts mixed in at replay.ratio."""
    texts, step.notes["bos_replay_dropped"] = bos_replay_rows(step)
    rows = mix(rows, nonempty(texts, "bos_replay", step.notes["bos_replay_dropped"]), step.config.replay.ratio,
               step.seed)
    step.notes["bos_replay_texts"] = len(texts)
    return rows


STRATEGY = Strategy("bos_replay", "pseudo replay: texts the model writes from its beginning-of-sequence token",
                    section=BosReplaySection, reads=("replay.ratio",), stage="self_replay", data=mix_bos_replay)
