"""knowledge_unknown: training on the items the base model never answers (Unknown), as many as knowledge_known
trains on; the same knowledge split, the other side (desta.posttrain.strategies.knowledge_known)."""

from __future__ import annotations

from desta.posttrain.strategies.base import Strategy
from desta.posttrain.strategies.knowledge_known import SPLIT_SETTINGS, split_part

STRATEGY = Strategy("knowledge_unknown", "trains on the items the base model never answers", reads=SPLIT_SETTINGS,
                    stage="select", data=lambda step, rows: split_part(step, rows, "unknown"))
