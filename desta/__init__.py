"""desta: train speech language models the DeSTA2 way, and post-train text LLMs without forgetting.

The speech pipeline, in order: audio (loading, ASR, TTS, the synthetic corpus) -> describe (stage 1) ->
targets (stage 2) -> model + train (stage 3) -> evaluation (stage 4) -> export (stage 5), with prompts
(every chat turn, training pool and eval instruction) shared by the stages and serving (chat, serve, app)
in front. posttrain is text post-training against forgetting; core holds what both products share.
"""


from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from desta.model.loading import build, load, save
    from desta.model.modeling import DestaConfig, DestaModel
    from desta.model.processing import DestaProcessor

# The top-level names, imported on first use: `import desta.model.parts` (or desta.core) then loads without the
# model classes, whose config needs a recent transformers (bench/gpu.py runs on GPU machines with older ones).
_EXPORTS = {"DestaConfig": "desta.model.modeling", "DestaModel": "desta.model.modeling",
            "DestaProcessor": "desta.model.processing", "build": "desta.model.loading",
            "load": "desta.model.loading", "save": "desta.model.loading"}
__all__ = ["DestaConfig", "DestaModel", "DestaProcessor", "build", "load", "save"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'desta' has no attribute {name!r}")
