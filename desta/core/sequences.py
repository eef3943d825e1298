"""Chat turns as token ids: labels on the assistant's answers, padding, the end-of-turn rule.

One implementation for every place that tokenizes a chat: the speech processor, the text
generation backends, text post-training and the servers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of a token that carries no loss
Conversation = list[dict[str, Any]]
_SENTINEL = "\u2063END\u2063"  # invisible text used to find where an assistant turn ends


def render_chat(tokenizer: PreTrainedTokenizerBase, conversation: Conversation,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template (not tokenized); with
    `add_generation_prompt`, ending with the header that opens the assistant's turn."""
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)


def strip_answers(conversation: Conversation) -> Conversation:
    """Assistant messages without surrounding whitespace, so the token after an answer is the one
    that ends the turn (trailing spaces would otherwise take its place and its loss)."""
    return [{**m, "content": m["content"].strip()} if m.get("role") == "assistant" and isinstance(m.get("content"), str)
            else m for m in conversation]


def response_spans(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content within the rendered `text`."""
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, conversation[:index], add_generation_prompt=True)
        content = str(message["content"])
        start = text.find(content, len(prefix)) if text.startswith(prefix) else -1
        if start < 0 or not content:
            raise ValueError(f"cannot locate assistant message {index} ({content[:40]!r}) in the rendered chat; the "
                             "chat template must render the history as a prefix of the whole conversation")
        spans.append((start, start + len(content)))
    return spans


def chat_tokens(tokenizer: PreTrainedTokenizerBase, conversation: Conversation, add_generation_prompt: bool = False,
                with_labels: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a rendered chat and their labels: each assistant answer and the token that ends
    its turn keep their ids, every other position is IGNORE_INDEX.

    >>> from desta.model.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ids, labels = chat_tokens(tok, [{"role": "user", "content": "Hi"},
    ...                                 {"role": "assistant", "content": "A man. "}])
    >>> tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    'A man.<|im_end|>'
    """
    conversation = strip_answers(conversation)
    text = render_chat(tokenizer, conversation, add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=with_labels)
    labels = [IGNORE_INDEX] * len(enc.input_ids)
    if with_labels:
        for start, end in response_spans(tokenizer, conversation, text):
            inside = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < end and b > start]
            after = [i for i, (a, _) in enumerate(enc.offset_mapping) if a >= end]
            for i in inside + after[:1]:  # the answer, then the token that ends the turn
                labels[i] = enc.input_ids[i]
    return list(enc.input_ids), labels


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None) -> set[int]:
    """Token ids at which an answer is over: the model's end-of-sequence ids, the tokenizer's, and the
    token the chat template puts after an assistant message."""
    ids: set[int] = set()
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        text = render_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}])
        tail = text[text.rfind(_SENTINEL) + len(_SENTINEL):]
        closing = tokenizer(tail, add_special_tokens=False).input_ids[:1]
        if closing and closing[0] in set(tokenizer.all_special_ids):
            ids.add(closing[0])
    return ids


def pad_batch(rows: list[list[int]], pad_id: int, side: Literal["left", "right"] = "right",
              labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Token rows -> input_ids and attention_mask (batch, longest), labels padded with IGNORE_INDEX.
    Left padding for generation (every prompt ends where the answer starts), right for training.

    >>> pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")["input_ids"].tolist()
    [[5, 6, 7], [0, 0, 8]]
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
        if labels is not None:
            out_labels[i, span] = torch.tensor(labels[i], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = out_labels
    return batch
