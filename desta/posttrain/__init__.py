"""Text post-training against forgetting: a chat LLM learns a new task with strategies that keep
what it could do (replay, Magpie pseudo replay, self-output with a verifier, paraphrased targets,
token filtering, LoRA), and a report that measures what each learns and forgets.

config (settings and strategy names), tasks (the new task and the replay set), strategies (each a
data transform), verifiers (is an answer right?), probes (what the model can still do), run (train
and measure each strategy), report (the comparison table and figure).
"""

from desta.posttrain.config import STRATEGIES, PostTrainConfig, TaskSection
from desta.posttrain.run import posttrain

__all__ = ["STRATEGIES", "PostTrainConfig", "TaskSection", "posttrain"]
