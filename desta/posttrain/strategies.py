"""Strategies against forgetting, each a transform of the training data (or of its labels).

magpie: pseudo replay the model writes itself from its bare user header; bos_replay: pseudo replay
it writes from its beginning-of-sequence token alone, trained as plain language modelling;
self_output: the model's own verified answers; paraphrase: the gold answers in the model's words;
self_distill: the model, shown the gold answer, rewrites its own answer; token_filter: no loss on
tokens the base model finds very unlikely; replay (desta.core.replay.mix) mixes old rows in.
knowledge_filter (desta.posttrain.knowledge) and rl (desta.posttrain.rl) have modules of their
own; lora is a training setting. `desta magpie` writes Magpie rows to a file on its own.
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
SELF_DISTILL_PROMPT = ("Question:\n{question}\n\nYour earlier answer:\n{own}\n\nA correct reference answer:\n{gold}"
                       "\n\nRewrite your earlier answer so that it is correct. Keep your own words and steps wherever "
                       "they are right. Reply with the answer only.")


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


# ----- pseudo replay: Magpie and from the beginning of sequence -----

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


def bos_prefix(tokenizer: PreTrainedTokenizerBase, prefix: str | None = None) -> str:
    """The text BOS replay samples from: `prefix`, else the tokenizer's BOS token."""
    text = prefix if prefix is not None else tokenizer.bos_token
    if not text:
        raise ValueError("the tokenizer has no BOS token; set bos_replay_prefix to the text samples start from, e.g. "
                         "its document separator (<|endoftext|>)")
    return text


def lm_rows(texts: list[str], prefix: str, min_words: int = 5) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Sampled texts -> language-modelling rows, each its prefix and text (see `encode`: loss on every token),
    without empty, short, looping or repeated texts; and how many were dropped for each reason.

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


# ----- self-output, paraphrase and self-distillation -----

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


def keep_self_distilled(row: dict, own: Generation, rewrite: Generation, verifier: Verifier) -> tuple[str, str]:
    """The self-distillation target of a row and where it came from: the rewrite if it finished and verifies,
    else the model's own answer if that verifies, else the gold answer.

    >>> row = {"instruction": "2 + 3?", "answer": "2 + 3 = 5. The answer is 5.", "gold": "5"}
    >>> from desta.posttrain.verifiers import last_number
    >>> keep_self_distilled(row, Generation("It is 6.", "stop", 4), Generation("It is 5.", "stop", 4), last_number)
    ('It is 5.', 'rewrite')
    """
    if rewrite.finish_reason == "stop" and rewrite.text and verifier(rewrite.text, row["gold"])[0]:
        return rewrite.text, "rewrite"
    if own.finish_reason == "stop" and own.text and verifier(own.text, row["gold"])[0]:
        return own.text, "own answer"
    return row["answer"], "gold"


def self_distill(backend: TransformersBackend, rows: list[dict], verifier: Verifier,
                 max_new_tokens: int = 160) -> tuple[list[dict], dict[str, int]]:
    """Self-distillation: the model answers each question (greedy), then, shown the gold answer, rewrites its own
    answer; the target is chosen by `keep_self_distilled`."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    own = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows], settings)
    rewrites = backend.generate([[{"role": "user", "content": SELF_DISTILL_PROMPT.format(
        question=r["instruction"], own=o.text, gold=r["answer"])}] for r, o in zip(rows, own, strict=True)], settings)
    counts = {"rewrite": 0, "own answer": 0, "gold": 0}
    out = []
    for row, answer, rewrite in zip(rows, own, rewrites, strict=True):
        target, source = keep_self_distilled(row, answer, rewrite, verifier)
        counts[source] += 1
        out.append({**row, "answer": target})
    return out, counts


# ----- tokenised examples and token filtering -----

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
