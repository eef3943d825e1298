"""sft: plain full fine-tuning on the new task's gold answers (transformers' Trainer on the examples). Every other
strategy changes this: its data, what trains, or how."""

from __future__ import annotations

from desta.posttrain.strategies.base import Strategy

STRATEGY = Strategy("sft", "plain full fine-tuning on the task's gold answers")
