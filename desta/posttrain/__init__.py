"""Text post-training against forgetting: a chat LLM learns a new task with strategies that keep
what it could do (replay, Magpie and BOS pseudo replay, self-output with a verifier, paraphrased and
self-distilled targets, token filtering, a knowledge-mastery filter, GRPO on its own samples, LoRA;
response tuning, a rule-based decoding adapter, self-alignment with DPO, self replay with a KL to the
base model, on-policy distillation from the base model, training on Known or Unknown items), and a
report that measures what each learns and forgets, with intervals and several seeds.

config (the settings: one section per strategy), tasks (the new task and the replay set), strategies/
(one module per strategy, each a `Strategy` record: its settings, what it combines with, its data transform
and its trainer), knowledge (the knowledge-mastery split), examples (rows tokenised), data (a run's data
step: the strategies' transforms, stage by stage), training (a run's training step: the strategies'
trainer), verifiers (is an answer right?), retention (what the model can still do, item by item), run
(train and measure each strategy and seed, resumably), report (the comparison table and figures),
token_shift (`desta token-shift`: which answer tokens alignment changed). The rule-based adapter itself is
desta.core.rules, usable by every generation path.
"""

from desta.posttrain.config import PostTrainConfig, TaskSection
from desta.posttrain.run import posttrain
from desta.posttrain.strategies import STRATEGIES

__all__ = ["STRATEGIES", "PostTrainConfig", "TaskSection", "posttrain"]
