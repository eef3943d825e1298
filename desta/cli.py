"""The `desta` command: one subcommand per stage, each configured by its stage's dataclass.

Every subcommand takes the same forms: positionals where the command has them, an optional
CONFIG.yaml, `key=value` overrides and `--key value` flags, all from one dataclass whose field
docstrings are the help (desta.core.args). `desta --help` lists the commands. A command prints
desta's own lines and progress bars only; `--verbose` (anywhere on the line) also lets the
libraries speak: transformers' and datasets' warnings and progress bars ("Loading weights").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from desta.describe.run import DescribeConfig
    from desta.evaluation.run import EvalConfig
    from desta.export import ExportConfig
    from desta.posttrain import PostTrainConfig
    from desta.targets import TargetsConfig
    from desta.train.config import TrainConfig
    from desta.train.plan import PlanConfig


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, where its settings class and its function live, its last line, what `desta --help`
    says it does, and whether a run that finished still failed (exit status 1)."""

    name: str
    config: str  # "module:Class" of the command's settings
    run: str  # "module:function" taking the settings
    done: Callable[[Any, Any], str | None]  # the line printed at the end, from (config, result)
    help: str | None = None  # default: the first paragraph of the settings class's docstring
    failed: Callable[[Any, Any], bool] = lambda config, result: False  # from (config, result): some work failed
    reads_inputs: bool = True  # False: it works from the settings alone (plan), so their paths need not exist


def _chunked(counts: Callable[[dict], str]) -> Callable[[Any, dict], str]:
    """The end-of-run line of a chunked stage: counts after a merge, or this shard's progress."""
    def line(config: DescribeConfig | TargetsConfig, summary: dict) -> str:
        if "inputs" in summary:
            return f"{counts(summary)} -> {Path(config.out) / 'dataset'}, {Path(config.out) / 'rejects.jsonl'}"
        stage = "describe" if hasattr(config, "mapping") else "targets"
        return (f"shard {summary['shard']}: {summary['chunks']} chunks done ({summary['run_now']} in this run); "
                f"merge with: desta {stage} --merge --out {config.out}")
    return line


def _trained(config: TrainConfig, summary: dict) -> str:
    return (f"trained {summary['steps']} steps on {summary['train_rows']} rows ({summary['samples_per_second']} "
            f"samples/s); loss {summary['first_train_loss']} -> {summary['last_train_loss']}; eval losses "
            f"{[round(v, 4) for _, v in summary['eval_losses']]}")


def _exported(config: ExportConfig, result: dict) -> str:
    lines = [f"exported {config.checkpoint} -> {result['folder']} ({result['bytes'] / 2**20:.1f} MiB, "
             f"{'full model' if result['full'] else 'trainable weights only'})"]
    push = result.get("push")
    if push:
        lines += [f"  {'would upload' if push.get('dry_run') else 'uploaded'} {name} ({size:,} bytes)"
                  for name, size in push["files"]]
        if not push.get("dry_run"):
            lines.append(f"pushed to {push['url']}")
    return "\n".join(lines)


def _evaluated(config: EvalConfig, report: dict) -> str:
    from desta.core.artifacts import REPORT_MD

    return ((Path(config.out) / REPORT_MD).read_text()
            + f"wrote {Path(config.out)}/report.json, report.md, scores.png; overall {report['overall']}")


def _planned(config: PlanConfig, result: dict) -> str:
    from desta.train.plan import render_plan

    return render_plan(result)


def _posttrained(config: PostTrainConfig, comparison: dict) -> str:
    from desta.posttrain.report import render_comparison

    return render_comparison(comparison)


COMMANDS = [
    Command("demo", "desta.demo:DemoConfig", "desta.demo:demo", lambda c, r: None),
    Command("synth", "desta.audio.synth:SynthConfig", "desta.audio.synth:write_corpus",
            lambda c, r: _load("desta.audio.synth:synth_done")(c, r)),
    Command("voices", "desta.audio.voices:VoicesConfig", "desta.audio.voices:catalogue_table", lambda c, r: r),
    Command("describe", "desta.describe.run:DescribeConfig", "desta.describe.run:describe", _chunked(lambda s: (
        f"inputs {s['inputs']} = described {s['described']} + rejected {s['rejected']} ({s['hours']} h described)"))),
    Command("probe", "desta.describe.probe:ProbeConfig", "desta.describe.probe:probe", lambda c, r: (
        (Path(c.out) / "probe.md").read_text() + f"wrote {c.out}/probe.md, probe.json, probe.png")),
    Command("targets", "desta.targets:TargetsConfig", "desta.targets:targets", _chunked(lambda s: (
        f"prompts {s['inputs']} = kept {s['kept']} + rejected {s['rejected']} {s['reasons'] or ''}"))),
    Command("train", "desta.train.config:TrainConfig", "desta.train.run:train", _trained),
    Command("plan", "desta.train.plan:PlanConfig", "desta.train.plan:plan", _planned, reads_inputs=False),
    Command("cache-features", "desta.train.config:TrainConfig", "desta.train.run:cache_features_for",
            lambda c, r: f"features cached in {r}",
            help="Compute the frozen Whisper encoder's features of a training config's data into data.feature_cache "
                 "(train reads them instead of running the encoder)."),
    Command("eval-set", "desta.evaluation.items:EvalSetConfig", "desta.evaluation.items:write_eval_set",
            lambda c, r: f"wrote {sum(r.values())} items to {c.out}: {r}"),
    Command("eval", "desta.evaluation.run:EvalConfig", "desta.evaluation.run:evaluate", _evaluated),
    Command("compare", "desta.evaluation.compare:CompareConfig", "desta.evaluation.compare:compare", lambda c, r: (
        (Path(c.out) / "compare.md").read_text() + f"wrote {c.out}/compare.md, compare.json, compare.png")),
    Command("export", "desta.export:ExportConfig", "desta.export:export_command", _exported),
    Command("chat", "desta.serving.chat:ChatConfig", "desta.serving.chat:chat", lambda c, r: (
        f"answered {r['answered']} of {r['rows']} rows ({r['failed']} with errors) -> {r['out']}" if c.batch
        else None), failed=lambda c, r: bool(c.batch and r["failed"])),
    Command("serve", "desta.serving.serve:ServeConfig", "desta.serving.serve:serve", lambda c, r: None),
    Command("app", "desta.serving.app:AppConfig", "desta.serving.app:app", lambda c, r: None),
    Command("posttrain", "desta.posttrain:PostTrainConfig", "desta.posttrain:posttrain", _posttrained),
    Command("magpie", "desta.posttrain.strategies.magpie:MagpieConfig",
            "desta.posttrain.strategies.magpie:write_magpie",
            lambda c, r: f"wrote {r['rows']} rows to {r['out']}; dropped {r['dropped']}"),
    Command("token-shift", "desta.posttrain.token_shift:TokenShiftConfig", "desta.posttrain.token_shift:token_shift",
            lambda c, r: (Path(c.out) / "token_shift.md").read_text() + f"wrote {c.out}/token_shift.md, .json, .png"),
    Command("convert-official", "desta.model.convert:ConvertConfig", "desta.model.convert:convert_official",
            lambda c, r: f"converted {c.src} -> {r}; load it with desta.load({str(r)!r})"),
    Command("tiny-models", "desta.model.tiny:TinyModelsConfig", "desta.model.tiny:write_tiny_models",
            lambda c, r: f"wrote {r[0]} and {r[1]}"),
    Command("tts", "desta.audio.tts:TTSConfig", "desta.audio.tts:speak", lambda c, r: f"wrote {c.out}: {r:.2f} s"),
]


def _load(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def usage() -> str:
    """The top-level help: the usage line and one line per command (its settings class's docstring)."""
    from desta.core.args import command_help

    width = max(len(c.name) for c in COMMANDS)
    lines = ["usage: desta COMMAND [ARGS] [CONFIG.yaml] [key=value ...] [--key value ...]", "",
             "Train speech LLMs the DeSTA2 way, and post-train text LLMs without forgetting.", "", "commands:"]
    lines += [f"  {c.name.ljust(width)}  {c.help or command_help(_load(c.config))}" for c in COMMANDS]
    lines += ["", "`desta COMMAND --help` lists the command's settings; --verbose also shows the libraries' warnings "
              "and progress bars."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one `desta` command line (default: sys.argv[1:]) and return the exit status: 0 when it ran (or
    printed --help), 1 when it ran but some of its work failed (rows of `desta chat --batch`), 2 on a usage or
    settings error or an error the stage raised (DESTA_DEBUG=1 re-raises it)."""
    from desta.core.args import ConfigError, parse_command

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
        config = parse_command(_load(command.config), argv[1:], prog=f"desta {command.name}", description=command.help,
                               check_paths=command.reads_inputs)
    except ConfigError as err:
        print(f"desta {command.name}: error: " + "\n  ".join(["invalid settings:", *err.problems]), file=sys.stderr)
        return 2
    try:
        result = _load(command.run)(config)
    except (ValueError, LookupError, OSError, RuntimeError, FloatingPointError) as err:
        if os.environ.get("DESTA_DEBUG"):
            raise
        print(f"desta {command.name}: error: {err}\n(set DESTA_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    line = command.done(config, result)
    if line:
        print(line)
    return 1 if command.failed(config, result) else 0


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
