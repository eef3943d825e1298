"""Typed run configs: nested dataclasses filled from YAML plus `key=value` overrides.

An unknown key is an error that names the nearest valid key; values from the command line are
parsed as YAML scalars (`optim.lr=3e-4`, `model.lora={r: 8}`), then checked against the field type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

# Names people bring from other trainers, mapped to ours, so the error can point at the right key.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps", "clip_grad_norm": "max_grad_norm",
           "output": "output_dir", "out": "output_dir", "lora_config": "lora"}


class ConfigError(ValueError):
    """A configuration problem; the message lists every problem found."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML values to the annotated type where it is lossless; raise on a mismatch."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value,
                                                                                                          bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """A dataclass from a nested mapping, with unknown keys reported with the nearest valid key."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems, kwargs = [], {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            near = [ALIASES[key]] if ALIASES.get(key) in names else difflib.get_close_matches(key, names, n=1,
                                                                                             cutoff=0.5)
            problems.append(f"unknown key {path!r}" + (f"; did you mean {(where + '.' if where else '') + near[0]!r}?"
                                                        if near else f"; valid keys: {names}"))
            continue
        try:
            kwargs[key] = _check_type(value, hints[key], path)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def apply_override(values: dict[str, Any], override: str) -> None:
    """Set a dotted key from `key=value` in a nested mapping (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. optim.lr=3e-4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """YAML file (optional) + overrides -> the typed config."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(values, override)
    return build(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
