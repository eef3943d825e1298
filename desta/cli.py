"""The `desta` command: one subcommand per stage, each configured by its stage's dataclass.

Every subcommand takes the same forms: positionals where the command has them, an optional
CONFIG.yaml, `key=value` overrides and `--key value` flags, all from one dataclass whose field
docstrings are the help (desta.core.args). `desta --help` lists the commands by group. Each command's
function returns what it prints at the end (its Summary). A command prints desta's own lines and
progress bars only; `--verbose` (anywhere on the line) also lets the
libraries speak: transformers' and datasets' warnings and progress bars ("Loading weights").
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, where its settings class and its function live, its group in `desta --help`, and
    what `desta --help` says it does. The function returns what the command prints: a desta.core.summary.Summary
    (its text; `failed` exits 1), a str, or None (nothing more to say)."""

    name: str
    config: str  # "module:Class" of the command's settings
    run: str  # "module:function" taking the settings
    group: str  # one of GROUPS
    help: str | None = None  # default: the first paragraph of the settings class's docstring
    reads_inputs: bool = True  # False: it works from the settings alone (plan), so their paths need not exist
    extra: str | None = None  # the `pip install 'desta[EXTRA]'` its module needs (desta.core.extras)


GROUPS = ("the pipeline", "use a model", "text post-training", "tools")
PIPELINE, USE, POSTTRAIN, TOOLS = GROUPS

COMMANDS = [
    Command("demo", "desta.demo:DemoConfig", "desta.demo:demo", PIPELINE),
    Command("describe", "desta.describe.run:DescribeConfig", "desta.describe.run:describe", PIPELINE),
    Command("probe", "desta.describe.probe:ProbeConfig", "desta.describe.probe:probe", PIPELINE),
    Command("targets", "desta.targets:TargetsConfig", "desta.targets:targets", PIPELINE),
    Command("train", "desta.train.config:TrainConfig", "desta.train.run:train", PIPELINE),
    Command("plan", "desta.train.plan:PlanConfig", "desta.train.plan:plan", PIPELINE, reads_inputs=False),
    Command("cache-features", "desta.train.config:TrainConfig", "desta.train.run:cache_features_for", PIPELINE,
            help="Compute the frozen Whisper encoder's features of a training config's data into data.feature_cache "
                 "(train reads them instead of running the encoder)."),
    Command("eval-set", "desta.evaluation.items:EvalSetConfig", "desta.evaluation.items:write_eval_set", PIPELINE),
    Command("eval", "desta.evaluation.run:EvalConfig", "desta.evaluation.run:evaluate", PIPELINE),
    Command("compare", "desta.evaluation.compare:CompareConfig", "desta.evaluation.compare:compare", PIPELINE),
    Command("export", "desta.export:ExportConfig", "desta.export:export_command", PIPELINE),
    Command("chat", "desta.serving.chat:ChatConfig", "desta.serving.chat:chat", USE),
    Command("serve", "desta.serving.serve:ServeConfig", "desta.serving.serve:serve", USE, extra="serve"),
    Command("app", "desta.serving.app:AppConfig", "desta.serving.app:app", USE, extra="app"),
    Command("posttrain", "desta.posttrain:PostTrainConfig", "desta.posttrain:posttrain", POSTTRAIN),
    Command("magpie", "desta.posttrain.strategies.magpie:MagpieConfig",
            "desta.posttrain.strategies.magpie:write_magpie", POSTTRAIN),
    Command("token-shift", "desta.posttrain.token_shift:TokenShiftConfig", "desta.posttrain.token_shift:token_shift",
            POSTTRAIN),
    Command("synth", "desta.audio.synth:SynthConfig", "desta.audio.synth:write_corpus", TOOLS),
    Command("voices", "desta.audio.voices:VoicesConfig", "desta.audio.voices:catalogue_table", TOOLS),
    Command("tts", "desta.audio.tts:TTSConfig", "desta.audio.tts:speak", TOOLS),
    Command("tiny-models", "desta.model.tiny:TinyModelsConfig", "desta.model.tiny:write_tiny_models", TOOLS),
    Command("convert-official", "desta.model.convert:ConvertConfig", "desta.model.convert:convert_official", TOOLS),
]


def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _help_line(command: Command) -> str:
    """What `desta --help` says of a command: its help, or the install it needs when its extra is missing."""
    from desta.core.args import command_help
    from desta.core.extras import install_hint, missing

    if command.extra and missing(command.extra):
        return f"(not installed: {install_hint(command.extra)})"
    return command.help or command_help(_load(command.config))


def usage() -> str:
    """The top-level help: the usage line, then each group's commands with one line each (its settings class's
    docstring)."""
    width = max(len(c.name) for c in COMMANDS)
    lines = ["usage: desta COMMAND [ARGS] [CONFIG.yaml] [key=value ...] [--key value ...]", "",
             "Train speech LLMs the DeSTA2 way, and post-train text LLMs without forgetting."]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        lines += [f"  {c.name.ljust(width)}  {_help_line(c)}" for c in COMMANDS if c.group == group]
    lines += ["", "`desta COMMAND --help` lists the command's settings; --verbose also shows the libraries' warnings "
              "and progress bars."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one `desta` command line (default: sys.argv[1:]) and return the exit status: 0 when it ran (or
    printed --help), 1 when it ran but some of its work failed (rows of `desta chat --batch`), 2 on a usage or
    settings error or an error the stage raised (DESTA_DEBUG=1 re-raises it)."""
    from desta.core.args import ConfigError, parse_command
    from desta.core.extras import MissingExtra, require_extra
    from desta.core.summary import Summary

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    _library_output(verbose)
    commands = {c.name: c for c in COMMANDS}
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command = commands.get(argv[0])
    if command is None:
        import difflib

        near = difflib.get_close_matches(argv[0], list(commands), n=1)
        print(f"desta: unknown command {argv[0]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
              + f"\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        if command.extra:
            require_extra(command.extra, "this command")
        config = parse_command(_load(command.config), argv[1:], prog=f"desta {command.name}", description=command.help,
                               check_paths=command.reads_inputs)
    except ConfigError as err:
        print(f"desta {command.name}: error: " + "\n  ".join(["invalid settings:", *err.problems]), file=sys.stderr)
        return 2
    except MissingExtra as err:
        print(f"desta {command.name}: error: {err}", file=sys.stderr)
        return 2
    try:
        result = _load(command.run)(config)
    except (ValueError, LookupError, OSError, RuntimeError, FloatingPointError, MissingExtra) as err:
        if os.environ.get("DESTA_DEBUG"):
            raise
        print(f"desta {command.name}: error: {err}\n(set DESTA_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    if isinstance(result, Summary | str) and str(result):
        print(result)
    return 1 if getattr(result, "failed", False) else 0


def _library_output(verbose: bool) -> None:
    """Unless `verbose`: transformers, datasets and huggingface_hub show errors only, and no progress bars of their
    own (desta's bars and lines are unaffected; an environment variable a user set wins)."""
    if verbose:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
