"""`desta token-shift BASE ALIGNED`: how few of an aligned model's answer tokens alignment changed, and which
(Lin et al., "The unlocking spell on base LLMs", URIAL, ICLR 2024).

The aligned model answers each prompt greedily through its chat template; the base model reads the same
token ids (the two must share a vocabulary; the base model needs no chat template) and, at every answer
position, ranks the aligned model's token among its own next-token choices: rank 1 is unshifted, ranks 2 to
`marginal_rank` are marginal shifts, lower ranks are shifted. A position "changed" when the token is not the
base model's top choice (marginal or shifted). Reported: the shares, the change rate by position in the
answer (its opening tokens, the rest, its end of turn), and the tokens that change most often, each with
the token the base model preferred there.

Reads two models (Hub ids or folders) and a prompt set (a JSONL with an instruction or prompt per line;
default: general requests drawn as the retention sets draw them). Writes OUT/token_shift.json (settings,
shares, per-position and per-token tables, every answer with its changed positions), OUT/token_shift.md and
OUT/token_shift.png. A report made with the same settings and models is kept (the command is resumable).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from desta.core.args import raise_problems
from desta.core.chunks import read_jsonl, write_atomic
from desta.core.digests import content_digest
from desta.core.hub import public_name
from desta.core.llm import load_causal_lm
from desta.core.sequences import chat_tokens, end_of_turn_ids, pad_batch
from desta.core.summary import Summary
from desta.posttrain.retention import REQUESTS, TOPICS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REPORT_JSON, REPORT_MD, REPORT_PNG = "token_shift.json", "token_shift.md", "token_shift.png"
# Answer positions (1-based) grouped for the position table and figure; the end of turn is its own group.
POSITION_GROUPS = (("1", 1, 1), ("2", 2, 2), ("3", 3, 3), ("4-5", 4, 5), ("6-10", 6, 10), ("11-20", 11, 20),
                   ("21+", 21, 10**9))


@dataclass
class TokenShiftConfig:
    """Token shift between a base model and its aligned version: which answer tokens alignment changed."""

    POSITIONAL = ("base", "aligned")

    base: str = ""
    """the base model (Hub id or folder); it reads the aligned model's answers and needs no chat template"""
    aligned: str = ""
    """its aligned version (Hub id or folder), which answers through its chat template"""
    out: str = "runs/token-shift"
    """folder for token_shift.json, token_shift.md and token_shift.png"""
    prompts: str | None = None
    """JSONL with an instruction (or prompt) per line; null: general requests (50 topics x 8 requests)"""
    count: int = 48
    """prompts to answer: the file's first N, or N drawn general requests"""
    max_new_tokens: int = 64
    """length limit of the aligned model's answers"""
    batch_size: int = 16
    """prompts per generate call"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: generate and score under bf16 autocast (faster on a CPU with bf16 instructions); fp32: exact"""
    marginal_rank: int = 3
    """base-model ranks 2 to this count as marginal shifts, lower ones as shifted (URIAL: 3)"""
    top_tokens: int = 20
    """tokens listed in the table and the figure"""
    seed: int = 0
    """which general requests are drawn"""
    overwrite: bool = False
    """redo a finished report made with other settings (default: refuse, naming what changed)"""

    def __post_init__(self) -> None:
        problems = []
        if not self.base or not self.aligned:
            problems.append(("base", "give both models: desta token-shift BASE ALIGNED"))
        if min(self.count, self.max_new_tokens, self.batch_size, self.top_tokens) < 1 or self.marginal_rank < 1:
            problems.append(("count", "count, max_new_tokens, batch_size, top_tokens and marginal_rank must be at "
                                      "least 1"))
        raise_problems(problems)


def load_prompts(config: TokenShiftConfig) -> list[str]:
    """The prompts: the first `count` of the file (instruction or prompt column), or `count` general requests."""
    if config.prompts:
        path = Path(config.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} not found; give a JSONL with an instruction per line")
        rows = read_jsonl(path)
        texts = [r.get("instruction") or r.get("prompt") for r in rows if isinstance(r, dict)]
        if not texts or not all(texts):
            raise ValueError(f"{path}: every line needs an instruction (or prompt) field")
        return texts[: config.count]
    pool = [request.format(topic) for topic in TOPICS for request in REQUESTS]
    if config.count > len(pool):
        raise ValueError(f"count {config.count}: the general requests number {len(pool)}; give a prompts file")
    return [pool[int(i)] for i in np.random.default_rng(config.seed).choice(len(pool), config.count, replace=False)]


def check_vocabularies(base: PreTrainedTokenizerBase, aligned: PreTrainedTokenizerBase) -> None:
    """Raise unless the two tokenizers map every token to the same id (the base model must read the same ids)."""
    if base.get_vocab() != aligned.get_vocab():
        raise ValueError(f"the base and aligned tokenizers differ ({len(base)} and {len(aligned)} tokens): token "
                         "shift compares the two models' choices of the same token ids, so give two models of one "
                         "family (a base model and its aligned version)")


@torch.no_grad()
def greedy_answers(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
                   batch_size: int, autocast: torch.dtype | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per prompt: the model's greedy answer through its chat template, up to and including
    its end-of-turn token (absent when the limit cut it)."""
    ends = end_of_turn_ids(tokenizer, llm.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [chat_tokens(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True,
                           with_labels=False)[0] for p in prompts]
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        batch = pad_batch(rows, pad, side="left")
        with torch.autocast(llm.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            ids = llm.generate(**{k: v.to(llm.device) for k, v in batch.items()}, do_sample=False, temperature=None,
                               top_p=None, top_k=None, max_new_tokens=max_new_tokens, pad_token_id=pad,
                               eos_token_id=sorted(ends))
        for row, prompt in zip(ids[:, batch["input_ids"].shape[1]:].tolist(), rows, strict=True):
            end = next((k for k, t in enumerate(row) if t in ends), None)
            out.append((prompt, row if end is None else row[: end + 1]))
    return out


@torch.no_grad()
def base_ranks(llm: PreTrainedModel, sequences: list[tuple[list[int], list[int]]], batch_size: int,
               autocast: torch.dtype | None) -> list[tuple[list[int], list[int]]]:
    """For each (prompt ids, answer ids): the base model's rank of each answer token among its next-token choices
    (1: its top choice) and its top choice there."""
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = pad_batch([p + a for p, a in chunk], 0, side="right")
        with torch.autocast(llm.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logits = llm(**{k: v.to(llm.device) for k, v in batch.items()}).logits.float()  # (batch, tokens, vocab)
        for row, (prompt, answer) in enumerate(chunk):
            if not answer:
                out.append(([], []))
                continue
            scores = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)]  # (answer, vocab)
            chosen = scores.gather(1, torch.tensor(answer, device=scores.device)[:, None])  # (answer, 1)
            out.append((((scores > chosen).sum(1) + 1).tolist(), scores.argmax(1).tolist()))
    return out


def shift_tables(tokens: list[list[str]], ranks: list[list[int]], base_top: list[list[str]], ended: list[bool],
                 marginal_rank: int, top_tokens: int) -> dict[str, Any]:
    """The shares (unshifted, marginal, shifted, changed = not the base model's top choice), the change rate by
    answer position (POSITION_GROUPS; an answer's end-of-turn token apart) and the most often changed tokens.

    >>> tables = shift_tables([["Sure", "!", "<end>"], ["Hi", "there"]], [[4, 1, 2], [1, 1]],
    ...                       [["The", "!", "."], ["Hi", "there"]], [True, False], 3, 5)
    >>> tables["shares"]
    {'positions': 5, 'unshifted': 0.6, 'marginal': 0.2, 'shifted': 0.2, 'changed': 0.4}
    >>> [(g["group"], g["positions"], g["changed"]) for g in tables["by_position"]][:2], tables["by_position"][-1]
    ([('1', 2, 0.5), ('2', 2, 0.0)], {'group': 'end of turn', 'positions': 1, 'changed': 1.0})
    >>> tables["tokens"][0]
    {'token': 'Sure', 'changed': 1, 'occurrences': 1, 'rate': 1.0, 'base_preferred': 'The'}
    """
    flat = [(k, t, r, b, end and k == len(row) - 1) for row, rr, bb, end in zip(tokens, ranks, base_top, ended,
                                                                                 strict=True)
            for k, (t, r, b) in enumerate(zip(row, rr, bb, strict=True))]
    n = max(len(flat), 1)
    marginal = sum(1 < r <= marginal_rank for _, _, r, _, _ in flat)
    shifted = sum(r > marginal_rank for _, _, r, _, _ in flat)
    shares = {"positions": len(flat), "unshifted": round((len(flat) - marginal - shifted) / n, 4),
              "marginal": round(marginal / n, 4), "shifted": round(shifted / n, 4),
              "changed": round((marginal + shifted) / n, 4)}
    by_position = []
    for name, low, high in POSITION_GROUPS:
        group = [r for k, _, r, _, end in flat if low <= k + 1 <= high and not end]
        if group:
            by_position.append({"group": name, "positions": len(group),
                                "changed": round(sum(r > 1 for r in group) / len(group), 4)})
    ends = [r for _, _, r, _, end in flat if end]
    if ends:
        by_position.append({"group": "end of turn", "positions": len(ends),
                            "changed": round(sum(r > 1 for r in ends) / len(ends), 4)})
    occurrences = Counter(t for _, t, _, _, _ in flat)
    changed = Counter(t for _, t, r, _, _ in flat if r > 1)
    preferred: dict[str, Counter] = {}
    for _, t, r, b, _ in flat:
        if r > 1:
            preferred.setdefault(t, Counter())[b] += 1
    table = [{"token": t, "changed": c, "occurrences": occurrences[t], "rate": round(c / occurrences[t], 4),
              "base_preferred": preferred[t].most_common(1)[0][0]} for t, c in changed.most_common(top_tokens)]
    return {"shares": shares, "by_position": by_position, "tokens": table}


def shown(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A token's text for the tables: decoded, with spaces and line breaks made visible.

    >>> from desta.model.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> shown(tok, tok(" man").input_ids[-1]), shown(tok, tok.convert_tokens_to_ids("<|im_end|>"))
    ('␠man', '<|im_end|>')
    """
    return tokenizer.decode([token_id]).replace(" ", "\u2420").replace("\n", "\u21b5")


def render_report(report: dict[str, Any]) -> str:
    """token_shift.md: the shares, the change rate by answer position and the most often changed tokens."""
    s, settings = report["shares"], report["settings"]
    lines = [f"# Token shift: {public_name(settings['base'])} -> {public_name(settings['aligned'])}", "",
             f"{report['answers']} answers by the aligned model (greedy, up to {settings['max_new_tokens']} tokens), "
             f"{s['positions']} answer positions, each ranked among the base model's next-token choices. Changed: "
             f"not the base model's top choice (marginal: rank 2-{settings['marginal_rank']}; shifted: lower).", "",
             "| positions | unshifted | marginal | shifted | changed |", "|---|---|---|---|---|",
             f"| {s['positions']} | {s['unshifted']:.1%} | {s['marginal']:.1%} | {s['shifted']:.1%} | "
             f"**{s['changed']:.1%}** |", "", "Changed share by position in the answer:", "",
             "| answer position | positions | changed |", "|---|---|---|"]
    lines += [f"| {g['group']} | {g['positions']} | {g['changed']:.1%} |" for g in report["by_position"]]
    lines += ["", "Most often changed tokens (\u2420 a space, \u21b5 a line break):", "",
              "| token | changed | occurrences | rate | base model's choice there |", "|---|---|---|---|---|"]
    lines += [f"| `{t['token']}` | {t['changed']} | {t['occurrences']} | {t['rate']:.0%} | `{t['base_preferred']}` |"
              for t in report["tokens"]]
    lines += ["", f"Time: {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """token_shift.png: the changed share by answer position (left) and the most often changed tokens (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = report["by_position"]
    left.bar([g["group"] for g in groups], [100 * g["changed"] for g in groups], color="#4477aa")
    left.axhline(100 * report["shares"]["changed"], color="#999", ls="--", lw=1, label="all positions")
    left.set_xlabel("position in the answer")
    left.set_ylabel("changed: not the base model's top choice (%)")
    left.legend(fontsize=8)
    tokens = report["tokens"][::-1]
    # the plot font lacks the table's space and line-break signs: a middle dot and \n instead
    labels = [t["token"].replace("\u2420", "\u00b7").replace("\u21b5", "\\n") for t in tokens]
    right.barh(labels, [t["changed"] for t in tokens], color="#cc6677")
    right.set_xlabel("changed positions (\u00b7 a space)")
    right.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"token shift {public_name(report['settings']['base'])} -> "
                 f"{public_name(report['settings']['aligned'])}: "
                 f"{report['shares']['changed']:.1%} of {report['shares']['positions']} positions changed",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_settings(config: TokenShiftConfig) -> dict[str, Any]:
    """What a report depends on: the settings but `out` and `overwrite`, and the two models' content digests."""
    settings = {k: v for k, v in asdict(config).items() if k not in ("out", "overwrite")}
    for key in ("base", "aligned", "prompts"):
        value = settings[key]
        if value and Path(value).exists():
            settings[f"{key}_digest"] = content_digest(Path(value))
    return settings


def token_shift(config: TokenShiftConfig) -> Summary:
    """Answer the prompts with the aligned model, rank every answer token under the base model, write the report
    (kept as it is when one with the same settings exists); returns it, printed as token_shift.md."""
    report = _token_shift_report(config)
    return Summary(report, render_report(report) + f"wrote {config.out}/{REPORT_MD}, {REPORT_JSON}, {REPORT_PNG}")


def _token_shift_report(config: TokenShiftConfig) -> dict[str, Any]:
    """The report of `token_shift`: the one on disk when its settings match, else made and written."""
    from transformers import AutoTokenizer

    out = Path(config.out)
    settings = report_settings(config)
    done = out / REPORT_JSON
    if done.is_file():
        report = json.loads(done.read_text())
        changed = sorted(k for k in settings if report["settings"].get(k) != settings[k])
        if not changed:
            return report
        if not config.overwrite:
            raise ValueError(f"{done} was made with other settings ({', '.join(changed)}); set overwrite=true to redo "
                             "it, or choose another out")
    started = time.perf_counter()
    autocast = torch.bfloat16 if config.precision == "bf16" else None
    aligned_tok, base_tok = AutoTokenizer.from_pretrained(config.aligned), AutoTokenizer.from_pretrained(config.base)
    if not getattr(aligned_tok, "chat_template", None):
        raise ValueError(f"the aligned model {config.aligned} has no chat template: it answers through one")
    check_vocabularies(base_tok, aligned_tok)
    prompts = load_prompts(config)
    aligned = load_causal_lm(config.aligned).eval()
    sequences = greedy_answers(aligned, aligned_tok, prompts, config.max_new_tokens, config.batch_size, autocast)
    del aligned
    ranked = base_ranks(load_causal_lm(config.base).eval(), sequences, config.batch_size, autocast)
    ends = end_of_turn_ids(aligned_tok)
    tokens = [[shown(aligned_tok, t) for t in answer] for _, answer in sequences]
    tops = [[shown(aligned_tok, t) for t in top] for _, top in ranked]
    ended = [bool(answer) and answer[-1] in ends for _, answer in sequences]
    report = {"settings": settings, "answers": len(prompts),
              **shift_tables(tokens, [r for r, _ in ranked], tops, ended, config.marginal_rank, config.top_tokens),
              "examples": [{"prompt": p, "answer": aligned_tok.decode(a, skip_special_tokens=True),
                            "changed": [{"position": k + 1, "token": tokens[i][k], "rank": r, "base": tops[i][k]}
                                        for k, r in enumerate(ranked[i][0]) if r > 1]}
                           for i, (p, (_, a)) in enumerate(zip(prompts, sequences, strict=True))],
              "seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / REPORT_MD, render_report(report))
    plot_report(report, out / REPORT_PNG)
    write_atomic(done, json.dumps(report, indent=1))  # last: its presence marks the report finished
    return report
