"""The self_align strategy: the model answers each new-task question several times, scores each of its own
answers (1 to 5, as a judge), and learns its own preferences with DPO (trl's DPOTrainer): one round of
Self-Rewarding Language Models (Yuan et al. 2024).

The score is the model's own: the judge prompt below, then the mean of 1..5 under its next-token
probabilities of the five digits (a small model seldom writes a parsable verdict, but always has these
probabilities). Each question whose best and worst answers differ by self_align.min_margin or more gives one
pair, chosen (best) over rejected (worst). No gold answer and no verifier enters training; the verifier only
reports afterwards how often the model's choice was the right answer where exactly one of the two was.

Reads the task's rows; trains the model in place (a peft model trains only its adapters, and its DPO
reference is the model with them switched off; a full model's reference is trl's frozen copy). It trains with a
trainer of its own, so it combines only with lora and rule_adapter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from desta.core.args import raise_problems
from desta.core.generation import SamplingSettings, TransformersBackend
from desta.core.optim import OptimSection, trainer_settings
from desta.core.sequences import pad_batch
from desta.posttrain.strategies.base import DataStep, Strategy, TrainStep, first_last, trl_problems
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trl import DPOTrainer


@dataclass
class SelfAlignSection:
    """DPO on the model's own judged answers: their best over their worst."""

    k: int = 4
    """sampled answers per new-task question (up to eval_max_new_tokens), each scored 1-5 by the model"""
    temperature: float = 0.8
    """sampling temperature of those answers"""
    min_margin: float = 0.25
    """a question gives a preference pair (its best and worst answer by the model's own score) only when the scores
    differ by at least this much"""
    lr: float | None = None
    """its learning rate (DPO moves a model with far smaller steps than sft: trl's default is 1e-6); null: optim.lr,
    or lora.lr with lora"""
    dpo: dict = field(default_factory=lambda: {"beta": 0.1})
    """trl DPOConfig settings (learning rate, steps and batch come from optim, or lora.lr with lora)"""

    def __post_init__(self) -> None:
        problems = []
        if self.k < 2 or not self.temperature > 0 or self.min_margin < 0:
            problems.append(("k", f"k must be at least 2 (a pair needs two answers), temperature positive and "
                                  f"min_margin 0 or more, got {self.k}, {self.temperature} and {self.min_margin}"))
        if self.lr is not None and not self.lr > 0:
            problems.append(("lr", f"must be positive or null, got {self.lr}"))
        raise_problems(problems)


JUDGE_PROMPT = ("Rate the answer below from 1 (wrong or unhelpful) to 5 (correct, clear and complete).\n\n"
                "Question:\n{question}\n\nAnswer:\n{answer}\n\nReply with one digit from 1 to 5.")
SCORES = ("1", "2", "3", "4", "5")


def score_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids of the digits 1..5, each one token (an error names a digit that is not)."""
    ids = [tokenizer(digit, add_special_tokens=False).input_ids for digit in SCORES]
    split = [digit for digit, i in zip(SCORES, ids, strict=True) if len(i) != 1]
    if split:
        raise ValueError(f"self_align scores with the digits 1-5 as single tokens; this tokenizer splits {split}")
    return [i[0] for i in ids]


@torch.no_grad()
def self_scores(backend: TransformersBackend, questions: list[str], answers: list[str]) -> list[float]:
    """The model's own score of each answer to its question: sum over k of k x p(digit k), p renormalised over the
    digits 1-5, at the first token of its reply to JUDGE_PROMPT. Batched as the backend generates (left padding,
    its batch size, its autocast)."""
    llm = backend.llm
    digits = torch.tensor(score_token_ids(backend.tokenizer), device=llm.device)
    values = torch.arange(1, 6, dtype=torch.float32, device=llm.device)
    prompts = [backend.encode([{"role": "user", "content": JUDGE_PROMPT.format(question=q, answer=a)}])
               for q, a in zip(questions, answers, strict=True)]
    scores: list[float] = []
    for start in range(0, len(prompts), backend.batch_size):
        batch = {k: v.to(llm.device) for k, v in pad_batch(prompts[start : start + backend.batch_size],
                                                            backend.pad_id, side="left").items()}
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt from 0
        with torch.autocast(llm.device.type, dtype=backend.autocast or torch.float32,
                            enabled=backend.autocast is not None):
            logits = llm(**batch, position_ids=positions).logits[:, -1]  # (batch, vocab)
        probs = logits.float()[:, digits].softmax(-1)  # (batch, 5)
        scores += (probs @ values).tolist()
    return scores


def preference_pairs(rows: list[dict], answers: list[list[str]], scores: list[list[float]],
                     min_margin: float) -> list[dict[str, Any]]:
    """One pair per question whose best and worst (distinct) answers' scores differ by `min_margin` or more.

    >>> rows = [{"instruction": "2 + 3?", "gold": "5"}, {"instruction": "1 + 1?", "gold": "2"}]
    >>> pairs = preference_pairs(rows, [["It is 5.", "It is 6.", "5"], ["2", "2"]], [[4.1, 2.0, 3.0], [3.0, 3.5]], 0.5)
    >>> [(p["chosen"], p["rejected"], p["margin"]) for p in pairs]
    [('It is 5.', 'It is 6.', 2.1)]
    """
    pairs = []
    for row, texts, values in zip(rows, answers, scores, strict=True):
        ranked = sorted(zip(values, texts, strict=True), key=lambda pair: pair[0])
        (low, rejected), (high, chosen) = ranked[0], ranked[-1]
        if chosen != rejected and high - low >= min_margin:
            pairs.append({"instruction": row["instruction"], "gold": row.get("gold"), "chosen": chosen,
                          "rejected": rejected, "chosen_score": round(high, 3), "rejected_score": round(low, 3),
                          "margin": round(high - low, 3)})
    return pairs


def judge_agreement(pairs: list[dict], verifier: Verifier) -> dict[str, int]:
    """Among the pairs where the verifier accepts exactly one answer: how often that one is the model's choice.

    >>> from desta.posttrain.verifiers import last_number
    >>> judge_agreement([{"chosen": "5", "rejected": "6", "gold": "5"}, {"chosen": "7", "rejected": "5", "gold": "5"},
    ...                  {"chosen": "1", "rejected": "2", "gold": "5"}], last_number)
    {'verifier separates': 2, 'model chose the right one': 1}
    """
    separated = agreed = 0
    for pair in pairs:
        chosen, rejected = (verifier(pair[k], pair["gold"])[0] for k in ("chosen", "rejected"))
        if chosen != rejected:
            separated += 1
            agreed += chosen
    return {"verifier separates": separated, "model chose the right one": agreed}


def self_align_pairs(backend: TransformersBackend, rows: list[dict], verifier: Verifier, k: int, temperature: float,
                     min_margin: float, seed: int = 0, max_new_tokens: int = 160) -> tuple[list[dict], dict[str, Any]]:
    """The preference pairs the model makes from `k` sampled answers to each row's question, and notes (pairs,
    mean score, `judge_agreement`)."""
    samples = backend.generate([[{"role": "user", "content": r["instruction"]}] for r in rows for _ in range(k)],
                               SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    texts = [g.text for g in samples]
    flat = self_scores(backend, [r["instruction"] for r in rows for _ in range(k)], texts)
    answers = [texts[i * k : (i + 1) * k] for i in range(len(rows))]
    scores = [flat[i * k : (i + 1) * k] for i in range(len(rows))]
    pairs = preference_pairs(rows, answers, scores, min_margin)
    if not pairs:
        raise ValueError(f"self_align: none of {len(rows)} questions had answers whose own scores differ by "
                         f"{min_margin} or more; lower self_align.min_margin or raise self_align.k")
    notes = {"pairs": len(pairs), "questions": len(rows), "mean_self_score": round(sum(flat) / len(flat), 3),
             **judge_agreement(pairs, verifier)}
    return pairs, notes


def train_dpo(model: Any, tokenizer: PreTrainedTokenizerBase, pairs: list[dict], optim: OptimSection,
              learning_rate: float, settings: dict[str, Any], output_dir: str, logging_steps: int = 5) -> DPOTrainer:
    """Train `model` with DPO on `pairs` (steps, batch, schedule and seed from `optim`; `settings`: further
    DPOConfig keys, e.g. beta); returns the trainer, its log history included."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p["instruction"]}],
                               "chosen": [{"role": "assistant", "content": p["chosen"]}],
                               "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    args = DPOConfig(**trainer_settings(optim, output_dir, learning_rate=learning_rate, logging_steps=logging_steps,
                                        save_strategy="no", report_to=[], disable_tqdm=True,
                                        gradient_checkpointing=optim.gradient_checkpointing, **settings))
    # the reference: a frozen copy (trl would reload it from the model's path); a peft model's is itself, adapters off
    reference = None if hasattr(model, "peft_config") else copy.deepcopy(model).eval().requires_grad_(False)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    return trainer


def judged_pairs(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows' preference pairs (`self_align_pairs`), answers as long as the task's evaluation reads them."""
    section = step.config.self_align
    pairs, step.notes["self_align"] = self_align_pairs(step.backend, rows, step.verifier, section.k,
                                                       section.temperature, section.min_margin, step.seed,
                                                       step.config.eval_max_new_tokens)
    return pairs


def train(step: TrainStep) -> tuple[Any, dict[str, Any]]:
    """DPO on the step's pairs (`train_dpo`) at self_align.lr (or the step's); notes: the first and last margin."""
    trainer = train_dpo(step.model, step.tokenizer, step.rows, step.config.optim, step.config.self_align.lr or step.lr,
                        step.config.self_align.dpo, str(step.scratch))
    return trainer, {"dpo_margin_first_last": first_last([r["rewards/margins"] for r in trainer.state.log_history
                                                          if "rewards/margins" in r])}


STRATEGY = Strategy("self_align", "DPO on the model's own answers, judged by itself: its best over its worst",
                    section=SelfAlignSection, combines=("lora", "rule_adapter"),
                    combines_why="trains with a trainer of its own", stage="pairs", data=judged_pairs, trainer=train,
                    check=lambda config: trl_problems(config.self_align.dpo, "self_align.dpo", "DPOConfig"))
