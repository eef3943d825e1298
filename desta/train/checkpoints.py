"""Checkpoints a run can trust: checkpoint-N/checksums.json holds the SHA-256 of every file, written once the
save is complete; a resume checks them, skips a damaged newer checkpoint for the one before it, and refuses
one that holds another model's trainable weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from desta.core import digests
from desta.core.artifacts import WEIGHTS
from desta.model.modeling import DestaModel

CHECKSUMS = "checksums.json"  # in each checkpoint-*: file name -> SHA-256, written once the save is complete


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (but CHECKSUMS itself), by path relative to it."""
    return digests.file_checksums(folder, skip=CHECKSUMS)


class CheckpointChecksums(TrainerCallback):
    """Writes checkpoint-N/checksums.json after each save, when every process has written its files: a
    checkpoint without it did not finish saving, one whose files differ from it was damaged since."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Hash the checkpoint the Trainer has just written (the main process; the others wait for it)."""
        from accelerate import PartialState
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        PartialState().wait_for_everyone()  # each process writes its own RNG state file
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                tmp = folder / (CHECKSUMS + ".tmp")
                tmp.write_text(json.dumps(file_checksums(folder), indent=1))
                tmp.replace(folder / CHECKSUMS)
        PartialState().wait_for_everyone()


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (naming the file), or None when its files match checksums.json."""
    listed = folder / CHECKSUMS
    if not listed.is_file():
        return f"{listed} is missing: the save did not finish (or predates checksums)"
    try:
        expected = json.loads(listed.read_text())
    except json.JSONDecodeError:
        return f"{listed} is damaged"
    found = file_checksums(folder)
    for name, digest in expected.items():
        if name not in found:
            return f"{folder / name} is missing"
        if found[name] != digest:
            return f"{folder / name} does not match its checksum (truncated or overwritten)"
    return None


def usable_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-* whose files match their checksums; a damaged newer one is named on stderr and
    skipped. Raises ValueError, naming each damaged file and the fix, when checkpoints exist but none is
    usable; None when there is none."""
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    problems = []
    for folder in checkpoints:
        problem = checkpoint_problem(folder)
        if problem is None:
            if problems:
                print(f"desta train: resuming from {folder.name} instead of the damaged newer checkpoint(s): "
                      + "; ".join(problems), file=sys.stderr, flush=True)
            return str(folder)
        problems.append(problem)
    if problems:
        raise ValueError(f"no checkpoint in {output_dir} can be resumed from: {'; '.join(problems)}. Set resume=false "
                         "to start over (or restore the files)")
    return None


def check_checkpoint(folder: str, model: DestaModel) -> None:
    """Refuse to resume from a checkpoint that does not hold this model's trainable weights."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as handle:
        names = set(handle.keys())
    expected = set(model.trainable_state_dict())
    if names != expected:
        raise ValueError(f"{folder} does not hold this model's trainable weights ({len(names ^ expected)} names "
                         "differ); was the model config changed? Use a new output_dir or resume=false")


