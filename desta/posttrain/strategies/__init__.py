"""The post-training strategies, one module each: its settings section, what it combines with, its data transform
and its trainer, in one `Strategy` record (base.py). A strategy is one of these names in `strategies`; several
combine with "+" (e.g. lora+replay), the name parsed by `parts` alone.

The registry below lists them; adding a strategy is one module and one line here (tests/test_strategies.py lists
what a module must hold). Its order is the order of the default `strategies` list and, within a stage, the order
the data transforms run in (base.STAGES).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from desta.posttrain.strategies import (
    bos_replay,
    knowledge_filter,
    knowledge_known,
    knowledge_unknown,
    lora,
    magpie,
    on_policy_distill,
    paraphrase,
    replay,
    replay_kl,
    response_tuning,
    rl,
    rule_adapter,
    self_align,
    self_distill,
    self_output,
    sft,
    token_filter,
)
from desta.posttrain.strategies.base import STAGES, Strategy

STRATEGIES: dict[str, Strategy] = {module.STRATEGY.name: module.STRATEGY for module in (
    sft,
    lora,
    replay,
    magpie,
    bos_replay,
    self_output,
    paraphrase,
    self_distill,
    token_filter,
    knowledge_filter,
    rl,
    response_tuning,
    rule_adapter,
    self_align,
    replay_kl,
    on_policy_distill,
    knowledge_known,
    knowledge_unknown,
)}


def parts(name: str) -> tuple[str, ...]:
    """The strategies a name combines with "+".

    >>> parts("lora+replay"), parts("sft")
    (('lora', 'replay'), ('sft',))
    """
    return tuple(name.split("+"))


def records(names: Iterable[str]) -> list[Strategy]:
    """The records of a run's strategies (its name's `parts`), in the registry's order."""
    named = set(names)
    return [record for name, record in STRATEGIES.items() if name in named]


def data_order(names: Iterable[str]) -> list[Strategy]:
    """The strategies among `names` that transform the data, in the order they run: by stage, then in the registry's
    order.

    >>> [r.name for r in data_order(parts("replay+knowledge_filter+token_filter+magpie+lora"))]
    ['knowledge_filter', 'magpie', 'replay', 'token_filter']
    """
    return sorted((r for r in records(names) if r.data is not None), key=lambda r: STAGES.index(r.stage))


def trains(names: Iterable[str]) -> bool:
    """Whether a run of these strategies trains at all (rule_adapter alone does not).

    >>> trains(["rule_adapter"]), trains(parts("sft+rule_adapter"))
    (False, True)
    """
    return any(r.trains for r in records(names))


def depends(record: Strategy) -> set[str]:
    """The settings a strategy's runs depend on, each a leaf of the config (e.g. magpie.count, replay.ratio): its
    section's and those it reads (a strategy's whole section, or one key)."""
    names = ((record.name,) if record.section else ()) + record.reads
    leaves = set()
    for name in names:
        section = STRATEGIES[name].section if name in STRATEGIES else None
        leaves |= {f"{name}.{f.name}" for f in dataclasses.fields(section)} if section else {name}
    return leaves


def foreign_settings(names: Iterable[str]) -> set[str]:
    """The settings only strategies other than `names` depend on: a run's fingerprint leaves them out, so adding
    Magpie settings does not make a finished sft run stale.

    >>> sorted(foreign_settings(["magpie"]))[:3], "replay.ratio" in foreign_settings(["magpie"])
    (['bos_replay.count', 'bos_replay.max_new_tokens', 'bos_replay.prefix'], False)
    """
    mine = set().union(*(depends(r) for r in records(names)))
    return set().union(*(depends(r) for r in STRATEGIES.values())) - mine
