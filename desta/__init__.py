"""desta: train speech language models the DeSTA2 way, and post-train text LLMs without forgetting."""

from desta.loading import build, load, save
from desta.modeling import DestaConfig, DestaModel
from desta.processing import DestaProcessor

__all__ = ["DestaConfig", "DestaModel", "DestaProcessor", "build", "load", "save"]
__version__ = "0.1.0"
