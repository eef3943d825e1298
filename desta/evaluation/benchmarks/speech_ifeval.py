"""Speech-IFEval (kehanlu/Speech-IFEval): does a speech LLM still follow instructions, as its authors score it.

Reads the repository's data/ folder: eval_data/*.jsonl with audios/ beside (untarred from audios.tar when
only the archive is there). closed_ended and creative_writing are scored by IFEval's checkers with the
authors' four changes; chain_of_thought needs an LLM judge. Its text version of an item is the authors'
cascade input, "Speech Input: {textual_audio}" and the instruction.
"""

from __future__ import annotations

import re
from typing import Any

from desta.core.chunks import read_jsonl
from desta.core.instructions import ensure_sentence_splitter, follows
from desta.evaluation.benchmarks.base import (
    Benchmark,
    audio_file,
    by_category,
    chosen,
    mean,
    pct,
    resolve_source,
)
from desta.evaluation.systems import TEXT, Judging

SPEECH_IFEVAL_FILES = {"closed_ended": "closed_ended_questions.jsonl", "creative_writing": "creative_writing.jsonl",
                       "chain_of_thought": "chain-of-thought.jsonl"}
SPEECH_IFEVAL_SYSTEM = "Follow the given instructions."  # what the authors' runners send to the SLM and the text LLM


def load_speech_ifeval(source: str, subsets: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """The repository's data/ folder (or the repository): eval_data/*.jsonl, audios/<audio_filepath>
    (untarred from audios.tar, which is extracted when only the archive is there)."""
    root = resolve_source(source)
    data = root / "data" if (root / "data" / "eval_data").is_dir() else root
    if not (data / "eval_data").is_dir():
        raise FileNotFoundError(f"{root}: no eval_data/ folder; give Speech-IFEval's data/ folder (from the GitHub "
                                "repository kehanlu/Speech-IFEval) with audios/ untarred beside eval_data/")
    if not (data / "audios").is_dir() and (data / "audios.tar").is_file():
        import tarfile

        with tarfile.open(data / "audios.tar") as archive:
            archive.extractall(data, filter="data")
    items, rejects = [], []
    for subset in chosen(subsets, SPEECH_IFEVAL_FILES, "Speech-IFEval"):
        for number, row in enumerate(read_jsonl(data / "eval_data" / SPEECH_IFEVAL_FILES[subset])):
            item_id = f"{subset}:{row.get('id', number)}"
            audio = data / "audios" / row["audio_filepath"]
            if not audio.is_file():
                rejects.append({"id": item_id, "source": str(audio), "reason": "audio file not found"})
                continue
            check: dict[str, Any] = {"style": "cot"} if subset == "chain_of_thought" else {
                "style": "speech_ifeval", "instructions": [{"id": kind, "kwargs": kwargs or {}} for kind, kwargs
                                                           in zip(row["instruction_id_list"], row["kwargs"],
                                                                  strict=True)]}
            items.append({"item_id": item_id, "id": row["audio_filepath"], "category": subset,
                          "instruction": row["instruction"], "system": SPEECH_IFEVAL_SYSTEM,
                          "text_input": f"Speech Input: {row['textual_audio']}\n\n{row['instruction']}",
                          "audio": audio_file(audio), "answer": row.get("label"), "choices": None, "check": check})
    return items, rejects


def _count_bullets(value: str) -> int:
    lines = value.replace("\\n", "\n").split("\n")
    return sum(bool(re.match(r"^\s*(\*[^*]|-|•|\d)", line)) for line in lines)


def _paragraphs_ok(value: str, wanted: int) -> bool:
    pieces = re.split(r"\s*\*\*\*\s*|\n+", value.strip())
    count = len(pieces)
    for index, piece in enumerate(pieces):
        if not piece.strip():
            if index in (0, len(pieces) - 1):
                count -= 1
            else:
                return False
    return count == wanted


def speech_ifeval_follows(answer: str, spec: dict[str, Any]) -> bool:
    """Whether an answer follows one instruction as Speech-IFEval checks it: IFEval strict, with the authors'
    four changes: bullet lists also count "•" and numbered lines; paragraphs split at any line break; the case
    checks skip language detection; the repeat-prompt check ignores surrounding quotes.

    >>> speech_ifeval_follows("1. calm\\n2. slow", {"id": "detectable_format:number_bullet_lists",
    ...                                             "kwargs": {"num_bullets": 2}})
    True
    >>> speech_ifeval_follows('"Answer: a woman."', {"id": "combination:repeat_prompt",
    ...                                              "kwargs": {"prompt_to_repeat": "Answer:"}})
    True
    """
    kind, kwargs = spec["id"], spec.get("kwargs") or {}
    if not answer.strip():
        return False
    if kind == "detectable_format:number_bullet_lists":
        return _count_bullets(answer) == kwargs["num_bullets"]
    if kind == "length_constraints:number_paragraphs":
        return _paragraphs_ok(answer, kwargs["num_paragraphs"])
    if kind == "change_case:english_capital":
        return answer.isupper()
    if kind == "change_case:english_lowercase":
        return answer.islower()
    if kind == "combination:repeat_prompt":
        return answer.strip().lower().strip("\"'").startswith(kwargs["prompt_to_repeat"].strip().lower())
    if kind == "length_constraints:number_sentences":
        ensure_sentence_splitter()
    return follows(answer, {"id": kind, "kwargs": {k: v for k, v in kwargs.items() if v is not None}}).value == 1.0


JUDGE_COT = ("Does the response below show reasoning, such as breaking the problem down, explaining intermediate "
             "steps or analysing, rather than giving only a direct answer? Answer YES if it reasons at all beyond "
             "a direct answer, NO only for a minimal, purely factual reply. End with 'Result: YES' or 'Result: NO'."
             "\n\n### Instruction:\n{prompt}\n\n### Response:\n{answer}")


def score(item: dict, answer: str, seed: int = 0) -> dict[str, Any]:
    """Closed-ended and creative-writing items: every instruction followed (Speech-IFEval's checkers);
    chain-of-thought items need the judge."""
    check = item["check"]
    if check["style"] == "cot":
        return {"score": None, "reason": "needs a judge"}
    followed = [speech_ifeval_follows(answer, spec) for spec in check["instructions"]]
    return {"score": float(all(followed)), "reason": ", ".join(
        f"{'follows' if ok else 'does not follow'} {spec['id']}" for ok, spec in zip(
            followed, check["instructions"], strict=True))}


def judge_prompt(item: dict, answer: str) -> list[dict] | None:
    """The judge's conversation for a chain-of-thought item, else None."""
    if item["check"]["style"] != "cot":
        return None
    return [{"role": "user", "content": JUDGE_COT.format(prompt=item["instruction"], answer=answer)}]


def judge_verdict(item: dict, replies: list[str]) -> dict[str, Any]:
    """"Result: YES" or NO in the judge's reply; a reply with neither scores nothing.

    >>> judge_verdict({}, ["It reasons step by step. Result: YES"])["score"]
    1.0
    """
    found = re.search(r"(?i)result:\s*(yes|no)", replies[0])
    if not found:
        return {"score": None, "reason": f"judge gave no Result: {replies[0][:40]!r}"}
    return {"score": float(found.group(1).lower() == "yes"), "reason": f"judge: {found.group(1).upper()}"}


def official(items: list[dict], results: list[dict]) -> dict[str, Any]:
    """The rate per part, IFrate (the mean of the parts scored) and the rate per instruction kind, in %."""
    by = by_category(items, results)
    rates = {c: mean([r["score"] for _, r in pairs if r["score"] is not None]) for c, pairs in by.items()}
    kinds: dict[str, list[float]] = {}
    for item, result in zip(items, results, strict=True):
        if result["score"] is not None and item["check"]["style"] == "speech_ifeval":
            kinds.setdefault(item["check"]["instructions"][0]["id"], []).append(result["score"])
    scored = [r for r in rates.values() if r is not None]
    return {"rates": {c: None if r is None else 100 * r for c, r in rates.items()},
            "if_rate": None if not scored else 100 * sum(scored) / len(scored),
            "if_rate_parts": sorted(c for c, r in rates.items() if r is not None),
            "by_instruction": {k: 100 * sum(v) / len(v) for k, v in sorted(kinds.items())}}


def render(official: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """The parts, IFrate and the forgetting rate against the text reference, then the rate per instruction."""
    systems = list(official)
    lines = ["| | " + " | ".join(labels[s] for s in systems) + " |", "|" + "---|" * (len(systems) + 1)]
    for part in ("closed_ended", "creative_writing", "chain_of_thought"):
        lines.append(f"| {part} (%) | " + " | ".join(pct(official[s]["rates"].get(part)) for s in systems) + " |")
    lines.append("| **IFrate** (%) | " + " | ".join(pct(official[s]["if_rate"]) for s in systems) + " |")
    reference = official.get(TEXT, {}).get("if_rate")
    for s in (s for s in systems if s != TEXT and reference is not None):
        delta = f"{(official[s]['if_rate'] - reference) / reference:+.2%}" if reference else \
            "undefined (the text reference follows no instruction)"
        lines.append(f"\nForgetting rate of {s} (Speech-IFEval's Δ = (IFrate - IFrate_text) / IFrate_text): "
                     f"{delta}.")
    parts = official[systems[0]]["if_rate_parts"]
    lines.append(f"\nIFrate is the mean of the parts scored here ({', '.join(parts)}); the published IFrate "
                 "averages closed-ended, creative writing and chain-of-thought (judged by an LLM).")
    kinds = sorted({k for s in systems for k in official[s]["by_instruction"]})
    lines += ["", "| instruction | " + " | ".join(labels[s] for s in systems) + " |", "|" + "---|" * (len(systems) + 1)]
    lines += [f"| {k} | " + " | ".join(pct(official[s]["by_instruction"].get(k)) for s in systems) + " |"
              for k in kinds]
    return lines


SPEECH_IFEVAL = Benchmark(
    name="speech-ifeval", load=load_speech_ifeval, score=score, official=official, render=render,
    published="GitHub kehanlu/Speech-IFEval data/ (audios.tar from the Hub dataset kehanlu/Speech-IFEval)",
    text_reference="Speech-IFEval's cascade input, 'Speech Input: {textual_audio}' and the instruction",
    system_prompt=SPEECH_IFEVAL_SYSTEM, judging=Judging(prompt=judge_prompt, verdict=judge_verdict))
