"""Text post-training against forgetting: a chat LLM learns a new task with strategies that keep
what it could do (replay, Magpie and BOS pseudo replay, self-output with a verifier, paraphrased and
self-distilled targets, token filtering, a knowledge-mastery filter, GRPO on its own samples, LoRA;
response tuning, a rule-based decoding adapter, self-alignment with DPO, self replay with a KL to the
base model, on-policy distillation from the base model, training on Known or Unknown items), and a
report that measures what each learns and forgets, with intervals and several seeds.

config (settings and strategy names), tasks (the new task and the replay set), strategies (each a
data transform), knowledge (the knowledge-mastery split), rl (GRPO), self_align (own judgments, DPO),
anchored (replay_kl and on_policy_distill: a divergence from the frozen base model), training (which
trainer a run uses), verifiers (is an answer right?), retention (what the model can still do, item by
item), run (train and measure each strategy and seed, resumably), report (the comparison table and
figures), token_shift (`desta token-shift`: which answer tokens alignment changed). The rule-based
adapter itself is desta.core.rules, usable by every generation path.
"""

from desta.posttrain.config import STRATEGIES, PostTrainConfig, TaskSection
from desta.posttrain.run import posttrain

__all__ = ["STRATEGIES", "PostTrainConfig", "TaskSection", "posttrain"]
