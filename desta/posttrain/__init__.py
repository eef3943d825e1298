"""Text post-training against forgetting: a chat LLM learns a new task with strategies that keep
what it could do (replay, Magpie and BOS pseudo replay, self-output with a verifier, paraphrased and
self-distilled targets, token filtering, a knowledge-mastery filter, GRPO on its own samples, LoRA),
and a report that measures what each learns and forgets, with intervals and several seeds.

config (settings and strategy names), tasks (the new task and the replay set), strategies (each a
data transform), knowledge (the knowledge-mastery split), rl (GRPO), verifiers (is an answer right?),
probes and retention (what the model can still do, item by item), run (train and measure each
strategy and seed, resumably), report (the comparison table and figures).
"""

from desta.posttrain.config import STRATEGIES, PostTrainConfig, TaskSection
from desta.posttrain.run import posttrain

__all__ = ["STRATEGIES", "PostTrainConfig", "TaskSection", "posttrain"]
