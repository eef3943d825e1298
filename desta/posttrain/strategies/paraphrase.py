"""paraphrase: the gold answers in the model's own words (SDFT, ACL 2024). The model rewrites each gold answer; the
rewrite replaces it only if the verifier still accepts it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from desta.core.generation import Generation, SamplingSettings
from desta.posttrain.strategies.base import DataStep, Strategy
from desta.posttrain.verifiers import Verifier

if TYPE_CHECKING:
    from desta.core.generation import TransformersBackend

PARAPHRASE_PROMPT = ("Rewrite the following answer in your own words. Keep every fact and the final result "
                     "exactly the same.\n\nAnswer:\n{answer}")


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


def paraphrased(step: DataStep, rows: list[dict]) -> list[dict]:
    """The rows with their answers paraphrased where the rewrite verifies."""
    rows, step.notes["paraphrase"] = paraphrase(step.backend, rows, step.verifier, step.config.answer_max_new_tokens)
    return rows


STRATEGY = Strategy("paraphrase", "the gold answers rewritten in the model's own words, kept if they verify",
                    stage="targets", data=paraphrased)
