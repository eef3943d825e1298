"""Stage 3, train: fit the connector (and optional LoRA) so the speech LLM answers like the text LLM.

config (the settings) -> data (targets rows -> examples -> batches; features: the frozen encoder's cache)
-> losses (what optim.loss names; on_policy: the on-policy distillation loss) -> trainer (sampling,
progress) and checkpoints (checksums, resume) -> run (`desta train`: setup -> fit -> save); plan
(`desta plan`: will it fit, how long, before renting the GPUs).
"""

from desta.train.run import TrainConfig, train

__all__ = ["TrainConfig", "train"]
