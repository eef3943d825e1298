"""The rule-based adapter: decoding rules that make a base (pretrained-only) model answer like a chat model,
with no training (Hewitt et al. 2024, "Instruction following without instruction tuning").

Two rules, applied to the next-token logits of an answer being written:
- end of turn: once the answer holds `end_min_tokens` tokens, the end-of-turn logits rise by `end_slope` per
  further token, and by `end_bias` more right after a token that ends a sentence (". ! ?" or a line break):
  a complete answer is let go;
- repetition: every word token (one whose text holds a letter) already in the answer loses `repeat_penalty`
  logits, once however often it occurred. Digits and punctuation are left alone: a worked sum repeats its numbers.

`RuleAdapter` is a transformers `LogitsProcessor`, so it works wherever transformers generates
(`llm.generate(..., logits_processor=LogitsProcessorList([adapter]))`, and the `logits_processor` hook of
desta.core.generation.TransformersBackend); `rule_nll` scores a given answer under the same rules, so a
likelihood measured "with the rules" is the likelihood of what the adapted model would sample.
Reads a tokenizer and the end-of-turn ids; writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor

from desta.core.args import raise_problems
from desta.core.sequences import IGNORE_INDEX, chat_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SENTENCE_END = re.compile(r"[.!?]\s*$|\n")


@dataclass
class RuleSettings:
    """How strongly the rule-based adapter ends answers and penalises repeated words."""

    end_min_tokens: int = 8
    """answer tokens before either end-of-turn rule applies (a shorter answer is never pushed to end)"""
    end_slope: float = 0.1
    """end-of-turn logit added per answer token past end_min_tokens: a long answer ends sooner"""
    end_bias: float = 3.0
    """end-of-turn logit added right after a token that ends a sentence (past end_min_tokens); higher: shorter
    answers"""
    repeat_penalty: float = 1.0
    """logits taken from each word token already in the answer; 0: no repetition rule"""

    def __post_init__(self) -> None:
        if self.end_min_tokens < 0 or min(self.end_slope, self.end_bias, self.repeat_penalty) < 0:
            raise_problems([("end_min_tokens", "end_min_tokens, end_slope, end_bias and repeat_penalty must be 0 or "
                                               f"more, got {self.end_min_tokens}, {self.end_slope}, {self.end_bias} "
                                               f"and {self.repeat_penalty}")])


def vocab_masks(tokenizer: PreTrainedTokenizerBase, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(word, sentence_end): boolean masks over `size` token ids: tokens whose text holds a letter, tokens whose
    text ends a sentence.

    >>> from desta.model.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> word, end = vocab_masks(tok, len(tok))
    >>> [bool(word[i]) for i in tok("Hi 42").input_ids], [bool(end[i]) for i in tok("Hi.").input_ids]  # Hi, space, 4, 2
    ([True, False, False, False], [False, True])
    """
    texts = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    decoded = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
    word = torch.zeros(size, dtype=torch.bool)
    end = torch.zeros(size, dtype=torch.bool)
    word[: len(decoded)] = torch.tensor([any(c.isalpha() for c in d) for d in decoded])
    end[: len(decoded)] = torch.tensor([bool(SENTENCE_END.search(d)) for d in decoded])
    return word, end


class RuleAdapter(LogitsProcessor):
    """A transformers LogitsProcessor applying `RuleSettings` to each answer a generate call writes.

    The answer starts where the generate call's prompt ends: the adapter remembers the prompt of the call it is
    in (a call extends its input by one token per step) and starts over on a new call.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_ids: set[int], settings: RuleSettings | None = None):
        if not end_ids:
            raise ValueError("the rule adapter needs the end-of-turn token ids (desta.core.sequences.end_of_turn_ids)")
        self.tokenizer, self.end_ids = tokenizer, sorted(end_ids)
        self.settings = settings or RuleSettings()
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prompt: torch.Tensor | None = None
        self._length = -1

    def adjust(self, scores: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Logits for the next token (batch, vocab) given each row's answer so far (batch, tokens) -> the adjusted
        logits (a new tensor, float32)."""
        s = self.settings
        scores = scores.float().clone()
        if scores.shape[-1] not in self._masks:
            self._masks[scores.shape[-1]] = vocab_masks(self.tokenizer, scores.shape[-1])
        word, sentence_end = (m.to(scores.device) for m in self._masks[scores.shape[-1]])
        written = answers.shape[1]
        if s.repeat_penalty and written:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, answers.clamp(0, scores.shape[-1] - 1), True)
            scores -= s.repeat_penalty * (seen & word).float()  # (batch, vocab)
        if written >= max(s.end_min_tokens, 1):
            bias = torch.full((scores.shape[0],), s.end_slope * (written - s.end_min_tokens), device=scores.device)
            bias += s.end_bias * sentence_end[answers[:, -1].clamp(0, scores.shape[-1] - 1)].float()
            scores[:, self.end_ids] += bias[:, None]
        return scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers' LogitsProcessor call: input_ids (batch, prompt + answer so far), scores (batch, vocab)."""
        prompt = self._prompt
        continuing = (prompt is not None and input_ids.shape[1] == self._length + 1
                      and input_ids.shape[0] == prompt.shape[0]
                      and torch.equal(input_ids[:, : prompt.shape[1]], prompt))
        if not continuing:
            self._prompt = input_ids.clone()
        self._length = input_ids.shape[1]
        assert self._prompt is not None
        return self.adjust(scores, input_ids[:, self._prompt.shape[1]:]).to(scores.dtype)


@torch.no_grad()
def rule_nll(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: RuleAdapter | None, instruction: str,
             answer: str) -> float:
    """Mean negative log-likelihood per answer token (the end of turn included) of `answer` to `instruction`,
    under the model's distribution adjusted by `adapter` position by position (None: the model's own)."""
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": answer}])
    logits = llm(input_ids=torch.tensor([ids], device=llm.device)).logits[0, :-1].float()  # (tokens - 1, vocab)
    targets = torch.tensor(labels[1:], device=llm.device)
    positions = (targets != IGNORE_INDEX).nonzero().flatten().tolist()
    if adapter is not None and positions:
        start = positions[0]
        for p in positions:
            logits[p] = adapter.adjust(logits[p : p + 1], targets[None, start:p])[0]
    return float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))
