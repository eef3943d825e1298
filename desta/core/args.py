"""One way to configure every command: a typed dataclass whose field docstrings are its help.

A command's settings come from the dataclass defaults, then an optional YAML file, then
`key=value` overrides and `--key value` flags (one thing spelled two ways; nested keys take dots:
`optim.lr=3e-4` or `--optim.lr 3e-4`). Values are read as YAML scalars and checked against the
field's type (`Literal` fields list their choices); an unknown key names the nearest valid one
(a key a config class lists in its `MOVED` mapping names its new place).
Every problem, those each dataclass finds in its `__post_init__` included (also when other
settings have the wrong type), is collected and raised once as a `ConfigError`, before any model
or dataset loads; on a command line, so is every local-looking input path that does not exist.

Written here rather than taken from jsonargparse or tyro: both build `--flags` from dataclasses,
but neither takes `key=value` overrides after a YAML file, suggests the nearest key, or reports
every problem of a config in one error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

# Names people bring from other trainers, mapped to ours, so the error points at the right key.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
           "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps", "clip_grad_norm": "max_grad_norm",
           "output": "output_dir", "out": "output_dir", "lora_config": "lora"}
OVERRIDE = re.compile(r"^[A-Za-z_][\w.-]*=")  # `key=value` on a command line
CONFIG_SUFFIXES = (".yaml", ".yml")
# A setting names something to read when its help says so; one named out or output_dir, or a cache, is written.
READS = re.compile(r"\b(folder|file|checkpoint|dataset|Hub id|jsonl|manifest|path)s?\b", re.IGNORECASE)
WRITES = re.compile(r"^(out|output_dir|.*cache)$")
# File types a value ends with when it names a file (a value without them may still be a Hub id)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".yaml", ".yml", ".txt", ".parquet", ".arrow", ".wav", ".flac",
                 ".mp3", ".ogg", ".safetensors", ".jinja")


class ConfigError(ValueError):
    """Configuration problems; `problems` lists each as "key: what is wrong and what to do"."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def raise_problems(problems: Iterable[tuple[str, str]]) -> None:
    """For `__post_init__`: raise every (field, message) problem at once, or nothing.

    >>> raise_problems([("lr", "must be positive, got -1.0")])
    Traceback (most recent call last):
    ...
    desta.core.args.ConfigError: lr: must be positive, got -1.0
    """
    found = [f"{name}: {message}" for name, message in problems]
    if found:
        raise ConfigError(found)


# ----- field documentation -----

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal on the line after the field, or a class's
    `__field_docs__` when it was made from another class's fields).

    >>> from desta.core.optim import OptimSection
    >>> field_docs(OptimSection)["max_grad_norm"]
    'gradient clipping'
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(klass.__dict__.get("__field_docs__", {}))  # a dataclass made from another's fields
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def command_help(cls: type) -> str:
    """The first paragraph of the dataclass docstring: what the command does."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


# ----- types -----

def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        return (options[0] if len(options) == 1 else typing.Union[tuple(options)]), optional  # noqa: UP007
    return hint, False


def _type_name(hint: Any) -> str:
    hint, optional = _unwrap_optional(hint)
    if typing.get_origin(hint) is Literal:
        name = "|".join(str(a) for a in typing.get_args(hint))
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in typing.get_args(hint))
    elif typing.get_origin(hint) is list:
        name = f"list of {_type_name((typing.get_args(hint) or (Any,))[0])}"
    elif typing.get_origin(hint) is dict or hint is dict:
        name = "mapping"
    else:
        name = getattr(hint, "__name__", str(hint))
    return name + (" or null" if optional else "")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Coerce a YAML value to the annotated type where that loses nothing; raise ConfigError otherwise."""
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
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
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
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


# ----- building a config -----

def looks_local(value: str) -> bool:
    """Whether a setting's text names a local file or folder rather than a Hub id or a name: an absolute, home or
    ./-relative path, a file name with a data or model suffix, or a path under an existing local folder.

    >>> [looks_local(v) for v in ("/data/x", "nope.jsonl", "openai/whisper-small", "tiny", "http://h/v1")]
    [True, True, False, False, False]
    """
    if not value or "://" in value or "\n" in value:
        return False
    if value.startswith(("/", "./", "../", "~")):
        return True
    if any(c.isspace() for c in value):
        return False
    if value.lower().endswith(FILE_SUFFIXES):
        return True
    head = value.split("/")[0]
    return "/" in value and Path(head).is_dir()


def path_problems(cls: type, values: dict[str, Any], prefix: str = "") -> list[str]:
    """A problem for each setting in a (nested) mapping of settings that names something to read (its help says
    folder, file, checkpoint, ...) as a local-looking path that does not exist."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    problems = []
    for name, value in values.items():
        section = _unwrap_optional(hints[name])[0] if name in hints else None
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            problems += path_problems(section, value, f"{prefix}{name}.")
            continue
        if name not in hints or WRITES.match(name) or not READS.search(docs.get(name, "")):
            continue
        items = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(name, value)]
        for key, item in items:
            if isinstance(item, str) and looks_local(item) and not Path(item).expanduser().exists():
                where = "" if Path(item).expanduser().is_absolute() else f" (from {Path.cwd()})"
                problems.append(f"{prefix}{key}: {item!r} not found{where}; give an existing file or folder"
                                + (", or a Hub id such as ORG/NAME" if "Hub" in docs[name] else ""))
    return problems


def _own_problems(cls: type, kwargs: dict[str, Any], bad: set[str], prefix: str) -> list[str]:
    """The dataclass's own checks (`__post_init__`) on the settings that are well typed, the others at their
    defaults, so range errors come out in the same pass as type errors; [] when a setting has no default."""
    values = dict(kwargs)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in values:
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                try:
                    values[f.name] = f.default_factory()
                except ConfigError:
                    return []
            else:
                return []
    try:
        cls(**values)
    except ConfigError as err:
        return [prefix + p for p in err.problems if p.split(":")[0].split(".")[0] not in bad]
    return []


def _mapping(default: Any) -> dict:
    """A setting's default if it is a mapping (e.g. peft settings), else an empty one."""
    return default if isinstance(default, dict) else {}


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """A dataclass from a nested mapping; every problem (unknown keys, types, missing required
    settings, the dataclass's own checks) is raised together."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    problems, kwargs = [], {}
    for key, value in values.items():
        if key not in fields:
            moved = getattr(cls, "MOVED", {}).get(key)  # a class's settings that moved: {old key: new dotted key}
            inside = [f"{name}.{key}" for name, f in fields.items()  # a key of a mapping setting's defaults
                      if f.default_factory is not dataclasses.MISSING and key in _mapping(f.default_factory())]
            near = ([moved] if moved else [ALIASES[key]] if ALIASES.get(key) in fields else inside[:1]
                    or difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5))
            problems.append(f"unknown key {prefix + key!r}" + (f"; did you mean {prefix + near[0]!r}?" if near
                                                               else f"; valid keys: {sorted(fields)}"))
            continue
        factory = fields[key].default_factory
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict) and factory not in (dataclasses.MISSING,
                                                                                                 hints[key]):
            value = {**dataclasses.asdict(factory()), **value}  # the section's defaults here, then the given keys
        try:
            kwargs[key] = _check_type(value, hints[key], prefix + key)
        except ConfigError as err:
            problems += err.problems
    for name, f in fields.items():
        if name not in values and dataclasses.is_dataclass(hints[name]):  # a section left out: its defaults, checked
            try:
                kwargs[name] = build(hints[name], {} if f.default_factory in (dataclasses.MISSING, hints[name])
                                     else dataclasses.asdict(f.default_factory()), prefix + name)
            except ConfigError as err:
                problems += err.problems
        elif name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix + name}: required; give it as {prefix + name}=VALUE or --{prefix + name} VALUE")
    if problems:
        bad = {p[len(prefix):].split(":")[0].split(".")[0].split("[")[0].strip("'") for p in problems}
        raise ConfigError(problems + _own_problems(cls, kwargs, bad, prefix))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError([prefix + p for p in err.problems]) from None


def _hint_at(cls: type, path: list[str]) -> Any:
    """The type hint of a dotted key, or None when the key does not exist."""
    hint: Any = cls
    for part in path:
        hint, _ = _unwrap_optional(hint)
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
        if hint is None:
            return None
    return hint


def parse_value(raw: Any, hint: Any) -> Any:
    """A command-line string read for a field: text stays text for `str` fields, lists may be
    comma-separated, everything else is a YAML scalar.

    >>> parse_value("3e-4", float), parse_value("007", str), parse_value("a,b", list[str])
    (0.0003, '007', ['a', 'b'])
    """
    if not isinstance(raw, str):
        return raw
    inner, optional = _unwrap_optional(hint) if hint is not None else (None, False)
    if optional and raw.strip() in ("null", "~", "None", "none"):
        return None
    if inner is str:
        return raw
    if inner is float:
        try:
            return float(raw)  # YAML 1.1 reads "3e-4" (no dot) as text
        except ValueError:
            pass
    if typing.get_origin(inner) is list and not raw.lstrip().startswith("["):
        (item,) = typing.get_args(inner) or (Any,)
        return [parse_value(part.strip(), item) for part in raw.split(",") if part.strip()]
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read {raw!r} as a value ({str(err).splitlines()[0]})") from None


def apply_override(values: dict[str, Any], cls: type, key: str, raw: Any) -> None:
    """Set a dotted key in a nested mapping, reading `raw` for the field's type."""
    parts = key.strip().replace("-", "_").split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section of settings")
    node[parts[-1]] = parse_value(raw, _hint_at(cls, parts))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a missing file or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return values


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """YAML file (optional) + `key=value` overrides -> the typed config."""
    values = read_yaml(path) if path is not None else {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value, e.g. optim.lr=3e-4")
        key, raw = override.split("=", 1)
        apply_override(values, cls, key, raw)
    return build(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as nested plain dicts (sections become dicts), e.g. to write it as YAML or JSON."""
    return dataclasses.asdict(config)


# ----- command lines -----

def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, hint, field) of every setting, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint, f))
    return out


def setting_docs(cls: type) -> dict[str, str]:
    """Every setting's dotted name and its docstring ("" where it has none).

    >>> setting_docs(__import__("desta.train", fromlist=["TrainConfig"]).TrainConfig)["optim.seed"][:22]
    'data order, initialisa'
    """
    return {name: field_docs(_owner(cls, name)).get(name.split(".")[-1], "") for name, _, _ in _leaves(cls)}


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default in (None, "", False) else f" (default: {f.default})"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return f" (default: {value})" if value not in ([], {}) else ""
    return " (required)"


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose flags are the dataclass fields (docstrings as help); `description` (default: the
    class docstring's first paragraph) heads its --help."""
    positional: tuple[str, ...] = getattr(cls, "POSITIONAL", ())
    words = " ".join(f"{p.upper()}{'...' if p.endswith('s') else ''}" for p in positional)
    parser = argparse.ArgumentParser(
        prog=prog, description=description or command_help(cls),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage=f"%(prog)s {words + ' ' if words else ''}[CONFIG.yaml] [key=value ...] [--key value ...]",
        epilog="Settings: defaults < CONFIG.yaml < key=value / --key value. Nested keys use dots, "
               "e.g. optim.lr=3e-4 or --optim.lr 3e-4.")
    parser.add_argument("words", nargs="*", help=argparse.SUPPRESS)
    fields = {f.name for f in dataclasses.fields(cls)}
    for old in sorted(set(getattr(cls, "MOVED", {})) - fields):  # taken, then refused by `build` naming the new key
        parser.add_argument("--" + old, *(["--" + old.replace("_", "-")] if "_" in old else []), dest=old,
                            nargs="?", const=True, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # a flag too
    docs_cache: dict[type, dict[str, str]] = {}
    for name, hint, f in _leaves(cls):
        owner = _owner(cls, name)
        doc = docs_cache.setdefault(owner, field_docs(owner)).get(f.name, "")
        if name in positional:
            continue
        flags = ["--" + name] + (["--" + name.replace("_", "-")] if "_" in name else [])
        inner, _ = _unwrap_optional(hint)
        text = f"{doc} [{_type_name(hint)}]{_default_text(f)}".strip().replace("%", "%%")  # argparse %-formats help
        if inner is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        elif typing.get_origin(inner) is dict or inner is dict:
            parser.add_argument(*flags, dest=name, action="append", metavar="KEY=VALUE",
                                default=argparse.SUPPRESS, help=text)
        elif typing.get_origin(inner) is list:
            parser.add_argument(*flags, dest=name, action="append", metavar="A,B",
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar=name.split(".")[-1].upper(),
                                help=text)
    return parser


def _owner(cls: type, dotted: str) -> type:
    """The dataclass that declares a dotted field."""
    owner = cls
    for part in dotted.split(".")[:-1]:
        owner = typing.get_type_hints(owner)[part]
    return owner


def _apply_flags(cls: type, flags: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """Set each `--key value` flag argparse collected into `values` (a dict's KEY=VALUE words, a list's items);
    returns the problems found."""
    problems: list[str] = []
    for name, given in flags.items():
        inner, _ = _unwrap_optional(_hint_at(cls, name.split(".")))
        if typing.get_origin(inner) is dict or inner is dict:
            bad = [g for g in given if "=" not in g]
            if bad:
                problems.append(f"--{name} takes KEY=VALUE, got {bad[0]!r}")
                continue
            given = dict(g.split("=", 1) for g in given)
        elif typing.get_origin(inner) is list:
            given = [item for g in given for item in parse_value(g, inner)]
        try:
            apply_override(values, cls, name, given)
        except ConfigError as err:
            problems += err.problems
    return problems


def parse_command(cls: type, argv: list[str], prog: str = "desta", description: str | None = None,
                  check_paths: bool = True) -> Any:
    """A command line -> the command's config: declared positionals, an optional CONFIG.yaml,
    `key=value` overrides and `--key value` flags (`description`: what --help says the command does). With
    `check_paths`, a local-looking input path that does not exist is one of the problems (`path_problems`)."""
    parser = build_parser(cls, prog, description)
    args = parser.parse_intermixed_args(argv)
    positional: tuple[str, ...] = getattr(cls, "POSITIONAL", ())
    config_file, overrides, free = None, [], []
    for word in args.words:
        if OVERRIDE.match(word):
            overrides.append(word)
        elif word.endswith(CONFIG_SUFFIXES) and config_file is None and not positional:
            config_file = word
        elif word.endswith(CONFIG_SUFFIXES) and config_file is None and Path(word).is_file():
            config_file = word
        else:
            free.append(word)
    values = read_yaml(config_file) if config_file else {}
    hints = typing.get_type_hints(cls)
    problems: list[str] = []
    for index, name in enumerate(positional):
        if not free:
            break
        if typing.get_origin(_unwrap_optional(hints[name])[0]) is list and index == len(positional) - 1:
            values[name], free = list(free), []
        else:
            values[name] = free.pop(0)
    if free:
        problems.append(f"unexpected argument(s) {free}; settings take key=value or --key value")
    for override in overrides:
        key, raw = override.split("=", 1)
        try:
            apply_override(values, cls, key, raw)
        except ConfigError as err:
            problems += err.problems
    problems += _apply_flags(cls, {k: v for k, v in vars(args).items() if k != "words"}, values)
    if check_paths:  # a command line's inputs must exist before anything loads
        problems += path_problems(cls, values)
    try:
        config = build(cls, values)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return config
