"""Checkpoints a run can trust: checkpoint-N/checksums.json holds the SHA-256 of every file, written once the
save is complete; a resume checks them, skips a damaged newer checkpoint for the one before it, and refuses
one that holds another model's trainable weights, or settings other than those the run was trained with
(run_config.yaml) unless the change is one a resume may make.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml
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




# Settings a resume may change without a word: where the run lives and what it prints, not what it trains.
RESUME_FREE = ("output_dir", "resume", "resume_with_changes", "data.num_workers", "log.progress", "log.report_to",
               "log.logging_steps", "log.save_total_limit")
# Settings a resume may change when told (resume_with_changes): how long it trains and how often it evaluates and
# saves; the steps already taken stay as they were (a longer run stretches the rest of its learning-rate schedule).
RESUME_CHANGEABLE = ("optim.max_steps", "optim.epochs", "log.eval_steps", "log.save_steps", "log.save_strategy")


def _sections(cls: type) -> dict[str, type]:
    """The fields of a config dataclass that are sections of settings (dataclasses themselves)."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)}


def _flat(values: dict[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, sections opened, mapping-valued settings (model.lora) kept whole:
    {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    out, sections = {}, _sections(cls)
    for key, value in values.items():
        if key in sections and isinstance(value, dict):
            out.update(_flat(value, sections[key], f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every setting's default by dotted key (sections included), from the dataclass alone."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in _sections(cls):
            out.update(_defaults(f.default_factory, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = f.default_factory()
    return out


def settings_changes(recorded: dict[str, Any], current: Any) -> dict[str, tuple[Any, Any]]:
    """The settings of `current` (a config dataclass) that differ from those `recorded` (run_config.yaml as read):
    dotted key -> (recorded, now). A setting the record lacks (added in a later desta) counts as its default."""
    cls = type(current)
    now = _flat(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(current), sort_keys=False)), cls)
    before = {**_defaults(cls), **_flat(recorded, cls)}
    missing = object()
    return {key: (before.get(key), now.get(key)) for key in sorted(set(now) | set(before))
            if before.get(key, missing) != now.get(key, missing)}


def check_resume_settings(run_config: Path, current: Any, with_changes: bool) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume with settings that change what the run trains: ValueError naming each difference and the
    fix (a new output_dir; resume_with_changes for the RESUME_CHANGEABLE ones). Returns the accepted changes."""
    if not run_config.is_file():
        return {}
    changes = {k: v for k, v in settings_changes(yaml.safe_load(run_config.read_text()) or {}, current).items()
               if k not in RESUME_FREE}
    fixed = {k: v for k, v in changes.items() if k not in RESUME_CHANGEABLE}
    told = {k: v for k, v in changes.items() if k in RESUME_CHANGEABLE and not with_changes}
    if fixed or told:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in {**fixed, **told}.items())
        fix = ("use a new output_dir (or resume=false to start over here)" if fixed else
               "give --resume-with-changes to resume with them, or a new output_dir")
        raise ValueError(f"{run_config.parent} was trained with other settings than these ({listed}); resuming "
                         f"would go on with a mix of both: {fix}. Only {', '.join(RESUME_CHANGEABLE)} may change on "
                         "a resume (with --resume-with-changes)")
    return changes
