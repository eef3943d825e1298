"""rule_adapter: no training; the model decodes every answer with two rules, a rising end of turn once an answer is
long enough and a penalty on repeated words (desta.core.rules; Hewitt et al. 2024). With another strategy, the
model that strategy trained decodes with the rules. Its settings are desta.core.rules.RuleSettings."""

from __future__ import annotations

from typing import Any

from desta.core.rules import RuleAdapter, RuleSettings
from desta.posttrain.strategies.base import Strategy


def rules(tokenizer: Any, eos_ids: set[int], config: Any) -> RuleAdapter:
    """The decoding rules (rule_adapter.*) as a logits processor: on every answer, and on the likelihood of the base
    model's answers (desta.core.rules.rule_nll)."""
    return RuleAdapter(tokenizer, eos_ids, config.rule_adapter)


STRATEGY = Strategy("rule_adapter", "no training: the model decodes with rules that end answers and curb repetition",
                    section=RuleSettings, trains=False, decoding=rules)
