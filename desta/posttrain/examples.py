"""Training rows as the model reads them: a row tokenised into an example (`encode`), examples into a padded batch
(`TextCollator`), and how likely the model finds a row's answer (`answer_nll`). Reads rows and a tokenizer;
writes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from desta.core.sequences import IGNORE_INDEX, chat_tokens, pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, row: dict, style: Literal["sft", "pretrain"],
           max_length: int) -> dict[str, list[int]]:
    """SFT: chat turns, labels only on the answer and its end of turn. Pretrain: raw text, every token. A
    language-modelling row ({"text": ...}, from bos_replay) is raw text with every token labelled in either style."""
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=False).input_ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    if style == "pretrain":
        ids = tokenizer(f"{row['instruction']}\n{row['answer']}{tokenizer.eos_token}",
                        add_special_tokens=False).input_ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": row["instruction"]},
                                          {"role": "assistant", "content": row["answer"]}])
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class TextCollator:
    """Tokenised examples -> a right-padded batch with labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Examples from `encode` -> input_ids, attention_mask and labels (batch, longest), padded on the right."""
        return pad_batch([e["input_ids"] for e in examples], self.pad_id, "right",
                         labels=[e["labels"] for e in examples])


@torch.no_grad()
def answer_nll(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instruction: str, answer: str) -> float:
    """Mean negative log-likelihood per answer token under the model (its perplexity's log)."""
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": answer}])
    batch = torch.tensor([ids], device=llm.device)
    targets = torch.tensor([labels], device=llm.device)
    logits = llm(input_ids=batch).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, targets[0, 1:], ignore_index=IGNORE_INDEX))
