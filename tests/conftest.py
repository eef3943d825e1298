from pathlib import Path

import numpy as np
import pytest
from transformers import TrainerCallback

from desta.audio.synth import synth_corpus
from desta.audio.tts import Voice, synthesize
from desta.demo import SMALL_LLM, SMALL_WHISPER, small_models_dir
from desta.describe import DescribeConfig, describe


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where a CUDA GPU is, and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    """About 2 s of real synthetic speech at 16 kHz."""
    return synthesize("Excuse me, where is the station?", Voice(accent="British", variant="f2"))


@pytest.fixture(scope="session")
def short_clip() -> np.ndarray:
    return synthesize("Hello.", Voice(accent="American", variant="m3"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A saved speech checkpoint on the tiny random bases (a test module may define its own)."""
    from desta.model.loading import build, save
    from desta.model.tiny import save_tiny_bases

    folder = tmp_path_factory.mktemp("ckpt")
    model, processor = build(*(str(p) for p in save_tiny_bases(folder / "bases")))
    save(model, processor, folder / "ckpt")
    return folder / "ckpt"


@pytest.fixture(scope="session")
def real_models():
    folder = small_models_dir()
    if folder is None:
        pytest.skip("real checkpoints absent: run tools/fetch_offline_models.sh (or set DESTA_MODELS)")
    return folder


def conversation(response: str | None = "A woman asks for the station.", instruction: str = "What can you hear?"):
    messages = [{"role": "user", "content": f"<|AUDIO|>\n{instruction}"}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def described_dataset(folder: Path, num_clips: int, seed: int) -> Path:
    """Synthetic clips run through describe; returns the dataset folder."""
    manifest = synth_corpus(folder / "corpus", num_clips=num_clips, seed=seed, progress=False)
    describe(DescribeConfig(source=str(manifest), out=str(folder / "d"), mapping="synthetic", progress=False))
    return folder / "d" / "dataset"


def load_real_models(folder: Path, **config_kwargs):
    """A DestaModel on real Whisper tiny.en + SmolLM2-135M-Instruct (fresh connector)."""
    from desta.model.loading import build

    return build(str(folder / SMALL_WHISPER), str(folder / SMALL_LLM), **config_kwargs)


class StopAfter(TrainerCallback):
    """Stop after a given step, with a checkpoint (an interrupted run to resume)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def label_targets(described: Path, out: Path) -> Path:
    """Targets written by template from the gold labels (no LLM): learnable, fast; returns the dataset folder."""
    from desta.targets import TargetsConfig, targets

    targets(TargetsConfig(source=str(described), out=str(out), kind="labels", progress=False))
    return out / "dataset"
