"""desta: train speech language models the DeSTA2 way, and post-train text LLMs without forgetting.

The speech pipeline, in order: audio (loading, ASR, TTS, the synthetic corpus) -> describe (stage 1) ->
targets (stage 2) -> model + train (stage 3) -> evaluation (stage 4) -> export (stage 5), with prompts
(every chat turn, training pool and eval instruction) shared by the stages and serving (chat, serve, app)
in front. posttrain is text post-training against forgetting; core holds what both products share.
"""

from desta.model.loading import build, load, save
from desta.model.modeling import DestaConfig, DestaModel
from desta.model.processing import DestaProcessor

__all__ = ["DestaConfig", "DestaModel", "DestaProcessor", "build", "load", "save"]
__version__ = "0.1.0"
