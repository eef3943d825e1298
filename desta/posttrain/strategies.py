"""Strategies against forgetting, each a transform of the training data (or of its labels).

magpie: pseudo replay the model writes itself; self_output: the model's own verified answers;
paraphrase: the gold answers in the model's words; token_filter: no loss on tokens the base model
finds very unlikely; replay (desta.core.replay.mix) mixes old rows in; lora is a training setting.
`desta magpie` writes Magpie rows to a file on its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from desta.core.generation import Generation, SamplingSettings, TransformersBackend
from desta.core.quality import repeated_ngram
from desta.core.sequences import IGNORE_INDEX, chat_tokens, end_of_turn_ids, pad_batch
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PARAPHRASE_PROMPT = ("Rewrite the following answer in your own words. Keep every fact and the final result "
                     "exactly the same.\n\nAnswer:\n{answer}")


# ----- Magpie pseudo replay -----

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
    tokenizer, llm = backend.tokenizer, backend.llm
    prefix = tokenizer(magpie_prefix(tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    stops = end_of_turn_ids(tokenizer, llm.generation_config)
    torch.manual_seed(seed)
    instructions, dropped = [], {"empty": 0, "too short": 0, "repetition": 0, "duplicate": 0, "unfinished": 0}
    for start in range(0, count, backend.batch_size):
        n = min(backend.batch_size, count - start)
        ids = prefix.repeat(n, 1).to(llm.device)
        out = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                           top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=backend.pad_id)
        for row in out[:, prefix.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), None)
            if end is None:
                dropped["unfinished"] += 1  # no end of the user turn within the budget
                continue
            instructions.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    kept, seen = [], set()
    for text in instructions:
        words = re.findall(r"\w+", text.lower())
        if not text:
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
    answers = backend.generate([[{"role": "user", "content": t}] for t in kept],
                               SamplingSettings(max_new_tokens=answer_tokens))
    rows = [{"instruction": t, "answer": a.text} for t, a in zip(kept, answers, strict=True) if a.text]
    dropped["empty"] += len(kept) - len(rows)
    return rows, dropped


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


def write_magpie(config: MagpieConfig) -> dict[str, Any]:
    """Write Magpie rows to config.out; returns the counts."""
    rows, dropped = magpie(TransformersBackend(config.model), config.count, config.max_new_tokens, seed=config.seed,
                           answer_tokens=config.answer_max_new_tokens)
    Path(config.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "dropped": dropped, "out": config.out}


# ----- self-output and paraphrase -----

@torch.no_grad()
def answer_nll(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, instruction: str, answer: str) -> float:
    """Mean negative log-likelihood per answer token under the model (its perplexity's log)."""
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": answer}])
    batch = torch.tensor([ids], device=llm.device)
    targets = torch.tensor([labels], device=llm.device)
    logits = llm(input_ids=batch).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, targets[0, 1:], ignore_index=IGNORE_INDEX))


def pick_verified(candidates: list[Generation], gold: Any, verifier: Verifier,
                  nll: Callable[[str], float]) -> str | None:
    """Among finished answers the verifier accepts, the one with the lowest `nll` (perplexity); None if none."""
    verified = [g.text for g in candidates if g.finish_reason == "stop" and g.text and verifier(g.text, gold)[0]]
    return min(verified, key=nll) if verified else None


def self_output(backend: TransformersBackend, rows: list[dict], verifier: Verifier, k: int, temperature: float,
                fallback: Literal["gold", "drop"], seed: int = 0,
                max_new_tokens: int = 160) -> tuple[list[dict], dict[str, int]]:
    """For each question, k sampled answers; verified ones compete on perplexity; else gold or drop."""
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in rows for _ in range(k)]
    samples = backend.generate(conversations, SamplingSettings(max_new_tokens=max_new_tokens,
                                                               temperature=temperature, seed=seed))
    out, counts = [], {"own answer": 0, "gold fallback": 0, "dropped": 0}
    for index, row in enumerate(rows):
        best = pick_verified(samples[index * k : (index + 1) * k], row["gold"], verifier,
                             lambda a, q=row["instruction"]: answer_nll(backend.llm, backend.tokenizer, q, a))
        if best is not None:
            out.append({**row, "answer": best})
            counts["own answer"] += 1
        elif fallback == "gold":
            out.append(row)
            counts["gold fallback"] += 1
        else:
            counts["dropped"] += 1
    return out, counts


def keep_paraphrase(row: dict, rewrite: Generation, verifier: Verifier) -> str:
    """The rewrite if it finished and still verifies, else the gold answer."""
    ok = rewrite.finish_reason == "stop" and rewrite.text and verifier(rewrite.text, row["gold"])[0]
    return rewrite.text if ok else row["answer"]


def paraphrase(backend: TransformersBackend, rows: list[dict], verifier: Verifier,
               max_new_tokens: int = 160) -> tuple[list[dict], dict[str, int]]:
    """The model rewrites each gold answer; the rewrite replaces it only if the verifier still accepts it."""
    rewrites = backend.generate([[{"role": "user", "content": PARAPHRASE_PROMPT.format(answer=r["answer"])}]
                                 for r in rows], SamplingSettings(max_new_tokens=max_new_tokens))
    out = [{**row, "answer": keep_paraphrase(row, rewrite, verifier)}
           for row, rewrite in zip(rows, rewrites, strict=True)]
    rewritten = sum(o["answer"] != r["answer"] for o, r in zip(out, rows, strict=True))
    return out, {"rewritten": rewritten, "gold kept": len(rows) - rewritten}


# ----- tokenised examples and token filtering -----

def encode(tokenizer: PreTrainedTokenizerBase, row: dict, style: Literal["sft", "pretrain"],
           max_length: int) -> dict[str, list[int]]:
    """SFT: chat turns, labels only on the answer and its end of turn. Pretrain: raw text, every token."""
    if style == "pretrain":
        ids = tokenizer(f"{row['instruction']}\n{row['answer']}{tokenizer.eos_token}",
                        add_special_tokens=False).input_ids[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    ids, labels = chat_tokens(tokenizer, [{"role": "user", "content": row["instruction"]},
                                          {"role": "assistant", "content": row["answer"]}])
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


@torch.no_grad()
def filter_tokens(llm: PreTrainedModel, examples: list[dict], threshold: float) -> tuple[list[dict], float]:
    """Token filtering: a target token whose probability under the base model is below `threshold`
    gets label -100. Returns the new examples and the share of target tokens masked."""
    masked = total = 0
    out = []
    for example in examples:
        ids = torch.tensor([example["input_ids"]], device=llm.device)
        probs = llm(input_ids=ids).logits[0, :-1].float().softmax(-1)
        labels = list(example["labels"])
        for position in range(1, len(labels)):
            if labels[position] == IGNORE_INDEX:
                continue
            total += 1
            if float(probs[position - 1, labels[position]]) < threshold:
                labels[position] = IGNORE_INDEX
                masked += 1
        out.append({**example, "labels": labels})
    return out, masked / max(total, 1)


class TextCollator:
    """Tokenised examples -> a right-padded batch with labels."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Examples from `encode` -> input_ids, attention_mask and labels (batch, longest), padded on the right."""
        return pad_batch([e["input_ids"] for e in examples], self.pad_id, "right",
                         labels=[e["labels"] for e in examples])
