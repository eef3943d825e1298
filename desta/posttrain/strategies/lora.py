"""lora: LoRA adapters (peft) train instead of the full weights, at a learning rate of their own; combines with
every strategy (Biderman et al., TMLR 2024: LoRA learns less and forgets less)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from desta.core.args import raise_problems
from desta.posttrain.strategies.base import Strategy


@dataclass
class LoraSection:
    """LoRA adapters train instead of the full weights (strategies that include lora)."""

    lr: float = 2e-4
    """learning rate of strategies that include lora (fewer parameters learn faster)"""
    peft: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    """peft LoraConfig settings"""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise_problems([("lr", f"must be positive, got {self.lr}")])


def with_adapters(model: Any, config: Any) -> tuple[Any, float]:
    """The model wrapped with LoRA adapters (peft; only they train), and lora.lr."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config.lora.peft)), config.lora.lr


STRATEGY = Strategy("lora", "LoRA adapters (peft) train instead of the full weights", section=LoraSection,
                    adapt=with_adapters)
